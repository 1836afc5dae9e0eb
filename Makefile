# mailgrid — `make run` starts the whole suite, `make test` runs every test.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: run test lint typecheck protos check-protos buf-lint bench readme clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(STAMP)

node_modules/.bin/buf: package.json
	npm install --no-audit --no-fund --silent
	touch $@

run: $(STAMP)
	$(BIN)/mailgrid up

test: $(DEV_STAMP) check-protos buf-lint lint typecheck
	$(BIN)/pytest -p no:cacheprovider

lint: $(DEV_STAMP)
	$(BIN)/ruff check .

typecheck: $(DEV_STAMP)
	$(BIN)/mypy mailgrid gateway metadata_svc delivery_svc search_svc realtime_svc bench

protos: $(DEV_STAMP)
	$(BIN)/python scripts/gen_protos.py

check-protos: $(DEV_STAMP)
	$(BIN)/python scripts/gen_protos.py --check

buf-lint: node_modules/.bin/buf
	node_modules/.bin/buf lint

# Regenerates the settings table in README.md from mailgrid/settings.py.
readme: $(STAMP)
	$(BIN)/python -c 'from mailgrid.cli import update_readme; update_readme("README.md")'

bench: $(DEV_STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) node_modules .mypy_cache .ruff_cache
