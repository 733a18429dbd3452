# Two commands: `make demo` and `make test` (both set up .venv from the pinned files first).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export NO_GCE_CHECK := true
export GCE_METADATA_HOST := 127.0.0.1:9
export GCE_METADATA_IP := 127.0.0.1:9

.PHONY: setup test lint demo bench bench-smoke clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q --upgrade "pip==26.3"
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements-dev.txt -c constraints.txt
	touch $(STAMP)

test: setup
	$(BIN)/ruff check dags plugins tests tools bench
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: setup
	$(BIN)/ruff check dags plugins tests tools bench

demo: setup
	$(BIN)/python tools/demo.py

bench: setup
	$(BIN)/python bench/run_bench.py

bench-smoke: setup
	$(BIN)/python bench/run_bench.py --smoke

clean:
	rm -rf .demo .airflow-test-home
