# Two commands on a fresh machine (no virtual environment needs to be active):
#   make demo   installs klest in .venv and runs the main job, `klest reproduce`
#   make test   installs the test requirements in .venv and runs lint, types, the tests and the
#               docs' snippets, saying which part runs and how long each took
# and, for maintainers:
#   make docs   rewrites the outputs shown in README.md and docs/*.md from what the code prints
#               now (read `git diff` afterwards); benchmark figures: bench_*.py --write-docs
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHELL := /bin/bash

# `$(call part,TITLE,COMMAND)`: a header line, the command, its wall time.
define part
	@echo "==> $(1)"
	@start=$$(date +%s); $(2); status=$$?; \
	echo "    ($$(( $$(date +%s) - start )) s)"; exit $$status
endef

PYTEST := $(BIN)/python -m pytest -q
# the core part: everything outside the subpackages' test folders, and the doctests of src/klest
CORE_TESTS := tests src/klest --ignore=tests/lab --ignore=tests/rl --ignore=tests/logits \
	--ignore=tests/test_docs.py

.PHONY: demo test lint typecheck pytest docs bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[lab,fast]"
	touch $@

$(VENV)/.test-installed: pyproject.toml requirements-test.txt | $(BIN)/python
	@echo "==> installing the test requirements into $(VENV) (first run: a few minutes)"
	$(BIN)/python -m pip install --quiet -r requirements-test.txt -e ".[lab]"
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/klest reproduce

lint: $(VENV)/.test-installed
	$(call part,lint: ruff check and ruff format --check (src tests benchmarks),\
		$(BIN)/ruff check src tests benchmarks && $(BIN)/ruff format --check src tests benchmarks)

typecheck: $(VENV)/.test-installed
	$(call part,types: mypy src/klest,$(BIN)/mypy src/klest)

# Each part runs even if an earlier one failed; the target fails if any did.
pytest: $(VENV)/.test-installed
	@failed=""; \
	run() { echo "==> tests: $$1"; start=$$(date +%s); shift; "$$@" || failed="$$failed [$$title]"; \
		echo "    ($$(( $$(date +%s) - start )) s)"; }; \
	title="core"; run "core (tests/*.py and the doctests of src/klest)" $(PYTEST) $(CORE_TESTS); \
	title="lab"; run "the lab (tests/lab)" $(PYTEST) tests/lab; \
	title="rl, logits"; run "klest.rl and klest.logits (tests/rl, tests/logits)" \
		$(PYTEST) tests/rl tests/logits; \
	title="docs"; run "the docs: README.md and docs/*.md run and compared (tests/test_docs.py)" \
		$(PYTEST) tests/test_docs.py; \
	if [ -n "$$failed" ]; then echo "==> failed:$$failed"; exit 1; fi

test: lint typecheck pytest test-trainers

docs: $(VENV)/.test-installed
	$(BIN)/python tests/docsync.py --update

bench: $(VENV)/.test-installed
	$(BIN)/python benchmarks/bench_estimate.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache

# verl and OpenRLHF pin versions that conflict with TRL's (requirements-test.txt) and with each
# other: their adapters' tests run in a second environment, created here (requirements-trainers.txt
# says what it holds and why). `make test` runs them after the main suite.
TVENV ?= .venv-trainers
TBIN := $(TVENV)/bin

.PHONY: test-trainers clean-trainers

$(TBIN)/python:
	$(PYTHON) -m venv $(TVENV)

$(TVENV)/.installed: pyproject.toml requirements-trainers.txt | $(TBIN)/python
	@echo "==> installing the verl/OpenRLHF test environment into $(TVENV) (first run: 2-3 minutes)"
	$(TBIN)/python -m pip install --quiet -r requirements-trainers.txt -e .
	$(TBIN)/python -m pip install --quiet --no-deps verl==0.9.1 openrlhf==0.11.2
	touch $@

test-trainers: $(TVENV)/.installed
	$(call part,tests: the verl and OpenRLHF adapters in $(TVENV) (tests/integrations),\
		$(TBIN)/python -m pytest -q tests/integrations/test_verl.py tests/integrations/test_openrlhf.py)

clean-trainers:
	rm -rf $(TVENV)

clean: clean-trainers
