# Set-up and entry points. Every target creates .venv on first use (CPU torch first: see README).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
PYTEST  := $(BIN)/python -m pytest

.PHONY: demo test test-slow test-distributed test-all lint clean

$(BIN)/trl-trm: pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test,dev]" $(TORCH)
	touch $@

## The main job: the offline demo (tiny local model, built-in task, CPU, no downloads).
demo: $(BIN)/trl-trm
	$(BIN)/trl-trm demo --output_dir outputs/demo

## Fast test suite (default).
test: $(BIN)/trl-trm
	$(PYTEST) -q -m "not slow and not vllm and not gpu and not distributed"

## Slow CPU tests (multi-second end-to-end runs).
test-slow: $(BIN)/trl-trm
	$(PYTEST) -q -m "slow and not vllm and not gpu and not distributed" || [ $$? -eq 5 ]  # 5: none selected

## 1-vs-2-process test (torchrun, gloo on CPU). Not in CI: it intermittently hangs (see README).
test-distributed: $(BIN)/trl-trm
	$(PYTEST) -q -m distributed

test-all: test test-slow

lint: $(BIN)/trl-trm
	$(BIN)/ruff check trl_trm tests benchmarks
	$(BIN)/ruff format --check trl_trm tests benchmarks

clean:
	rm -rf $(VENV) outputs .pytest_cache
