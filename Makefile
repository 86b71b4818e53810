# The README's two commands: `make quickstart` and `make test`. Each runs the idempotent set-up first.
PY := .venv/bin/python
export PYTHONWARNINGS ?= ignore::FutureWarning,ignore::UserWarning

.PHONY: setup test test-fast lint format quickstart clean

setup:
	@bash tools/setup_env.sh

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

# formatter (black style), import order and linter, configured in pyproject.toml
lint: setup
	.venv/bin/ruff format --check --diff .
	.venv/bin/ruff check .

format: setup
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

quickstart: setup
	@bash tools/quickstart.sh

clean:
	rm -rf output
