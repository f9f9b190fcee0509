# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch that lies on the dev machines; override with TORCH_SPEC="torch" for a CUDA build.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

.PHONY: install demo lint test bench
install: $(VENV)/.installed

demo: install
	$(BIN)/sampletok demo --out runs/demo

LINT_PATHS := src tests benchmarks

lint: install
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy src

test: install
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy src
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/bench_history.py
