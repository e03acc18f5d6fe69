# The README's two commands are `make run` and `make test`; everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help setup lock audit run serve test test-fast lint format bench bench-topology loadtest clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

# The locked set: requirements/pip.txt (the installer, upgraded first) and requirements/dev.txt
# (Tandem's dependencies with its dev tools) for the venv and CI, requirements/image.txt (the
# runtime ones and the build backend, at the versions dev.txt pins) for the Dockerfile. Every pin carries the hashes of its files on the index, and
# --require-hashes refuses a file whose hash differs, or a dependency the lock does not pin.
# Then Tandem itself, editable, without dependencies and with the locked setuptools (no
# isolated build environment fetched from the index unchecked).
PIP_LOCK := requirements/pip.txt
DEV_LOCK := requirements/dev.txt
IMAGE_LOCK := requirements/image.txt

$(STAMP): pyproject.toml $(PIP_LOCK) $(DEV_LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes -r $(PIP_LOCK)
	$(BIN)/pip install --quiet --require-hashes -r $(DEV_LOCK)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP) ## create .venv and install Tandem with its dev tools, exactly as locked

# uv writes the command into each file's header, as the update bot reads it back (options with
# `=`). A file that exists gives its pins as preferences: only what pyproject.toml's change
# needs moves. `make lock LOCK_ARGS=--upgrade` moves every pin to the newest allowed,
# `LOCK_ARGS='--upgrade-package NAME'` one package.
LOCK_ARGS ?=
UV_COMPILE = $(BIN)/uv pip compile --quiet --generate-hashes --universal $(LOCK_ARGS)

lock: $(STAMP) ## pin every dependency with its hashes (requirements/*.txt) from pyproject.toml
	$(UV_COMPILE) --output-file=$(PIP_LOCK) requirements/pip.in
	$(UV_COMPILE) --extra=dev --output-file=$(DEV_LOCK) pyproject.toml
	$(UV_COMPILE) --constraint=$(DEV_LOCK) --output-file=$(IMAGE_LOCK) pyproject.toml requirements/image.in

# Network: the vulnerability service. Outside `make test` (the suite needs no network); .ci/run
# runs it after the tests. A known vulnerability fails it; a service that cannot be reached,
# or has no record of a pin, is reported on a line of its own and does not.
audit: $(STAMP) ## check the locked dependencies against known vulnerabilities (pip-audit)
	$(BIN)/python tools/audit.py $(IMAGE_LOCK) $(DEV_LOCK) $(PIP_LOCK)

INSTANCES ?= 5
PORT ?= 8000

run: $(STAMP) ## 5 instances on :8000, each alone on :8001.. (embedded PostgreSQL unless TANDEM_DATABASE_URL is set)
	$(BIN)/tandem cluster --instances $(INSTANCES) --port $(PORT)

serve: $(STAMP) ## one instance on :8000
	$(BIN)/tandem serve --port $(PORT)

# The whole suite spreads its test files over WORKERS processes (pytest-xdist, `--dist
# loadfile`: a file's tests stay on one worker, so its module-scoped database and servers are
# made once; each worker is a session with its own embedded PostgreSQL). Most slow tests wait on
# timers, processes and containers, so two workers on two cores finish well before one.
# (`--dist loadgroup` did not group here: with pytest 9.2 and xdist 3.8 a file's tests still went
# to both workers, so each built the file's servers and compose stack.)
WORKERS ?= 2

test: $(STAMP) ## lint, type-check and run the whole test suite against a real PostgreSQL
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -n $(WORKERS) --dist loadfile --no-loadscope-reorder

# Every test that starts no process and no container (tests/conftest.py marks the others from
# what they start), over WORKERS processes as the whole suite (each worker on its own embedded
# PostgreSQL, or TANDEM_TEST_DATABASE_URL). A test that starts a process anyway fails here
# (TANDEM_TEST_NO_PROCESSES).
test-fast: $(STAMP) ## the fast tier, after every change: no process, no container (under a minute)
	TANDEM_TEST_NO_PROCESSES=1 $(BIN)/pytest -m "not slow and not container" -n $(WORKERS) --dist loadfile --no-loadscope-reorder

lint: $(STAMP) ## ruff and mypy only
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP) ## apply ruff's formatting and fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

loadtest: $(STAMP) ## 10000 concurrent withdrawals against a running `make run`
	$(BIN)/tandem loadtest --url http://127.0.0.1:8000

bench: $(STAMP) ## wallet benchmark: database floor vs end to end, medians of 3
	$(BIN)/python bench/wallet.py --runs 3

bench-topology: $(STAMP) ## the burst on 1 instance vs 5 (SO_REUSEPORT) vs nginx, medians of 3
	$(BIN)/python bench/topology.py --runs 3

clean: ## remove the venv, caches and the embedded database
	rm -rf $(VENV) .tandem .pytest_cache .mypy_cache .ruff_cache .hypothesis
