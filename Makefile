# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[local,dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/lakevision demo

test: setup
	$(BIN)/ruff check src jobs tests benchmarks notebooks
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python benchmarks/ingest.py

clean:
	rm -rf .lakevision benchmarks/.data
