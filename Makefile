# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[local,dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/lakevision demo

# Two test processes, each taking whole files, the longest first (tests/conftest.py orders them);
# the full run prints its 15 slowest steps, to keep an eye on the suite's time
PYTEST_PARALLEL := -n 2 --dist loadfile --no-loadscope-reorder

test: setup
	$(BIN)/ruff check src jobs tests benchmarks notebooks
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest $(PYTEST_PARALLEL) --durations=15

# The unit tier: no Ray, no JVM, no training; under 3 minutes.
test-fast: setup
	$(BIN)/ruff check src jobs tests benchmarks notebooks
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest $(PYTEST_PARALLEL) -m "not slow"

bench: setup
	$(BIN)/python benchmarks/ingest.py

clean:
	rm -rf .lakevision benchmarks/.data
