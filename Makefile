# Two commands on a fresh machine (no virtual environment needs to be active):
#   make demo   installs klest in .venv and runs the main job, `klest reproduce`
#   make test   installs the test requirements in .venv and runs lint, types and the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck pytest bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[lab,fast]"
	touch $@

$(VENV)/.test-installed: pyproject.toml requirements-test.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements-test.txt -e ".[lab]"
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/klest reproduce

lint: $(VENV)/.test-installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(VENV)/.test-installed
	$(BIN)/mypy src/klest

pytest: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

bench: $(VENV)/.test-installed
	$(BIN)/python benchmarks/bench_estimate.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
