# Set-up and everyday commands. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export BENTOML_DO_NOT_TRACK := true
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false

.PHONY: venv lock demo test lint bench clean-data

# The venv is installed from the lock (every package pinned, with hashes) and reinstalled when it changes.
LOCK := requirements.lock
$(VENV)/.installed: $(LOCK) pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -qq --no-deps --no-build-isolation -e .
	@touch $@

# Re-resolve the lock from pyproject.toml's ranges (after adding or changing a dependency there).
lock:
	@test -x $(BIN)/uv || { $(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install -qq uv; }
	$(BIN)/uv pip compile pyproject.toml --extra dev --generate-hashes --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --no-header --quiet -o $(LOCK)
	@sed -i '1i # The exact environment of cxr (Python 3.11, Linux x86-64): `make lock` writes it from pyproject.toml, `make venv` installs it.' $(LOCK)

venv: $(VENV)/.installed

# The mission on synthetic data: dvc repro, a short tune, promote, serve, an external hospital (scripts/demo.py).
demo: venv
	@python scripts/demo.py

test: venv lint
	@tests/system_packages.sh
	pytest

# Style and structure: ruff, and import-linter's contracts in pyproject.toml (the layers, no cycles).
lint: venv
	ruff check src tests benchmarks scripts
	ruff format --check src tests benchmarks scripts
	lint-imports

# `make bench` runs the default set (< 20 min on 2 CPU cores); `make bench BENCH_ARGS=--full` adds the long ones.
BENCH_ARGS ?=
bench: venv
	python benchmarks/run_all.py $(BENCH_ARGS)

clean-data:
	rm -rf data models reports
