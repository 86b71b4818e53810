# The README's two commands: `make quickstart` and `make test`. Each runs the idempotent set-up first.
PY := .venv/bin/python
export PYTHONWARNINGS ?= ignore::FutureWarning,ignore::UserWarning

.PHONY: setup test test-fast quickstart clean

setup:
	@bash tools/setup_env.sh

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

quickstart: setup
	@bash tools/quickstart.sh

clean:
	rm -rf output
