# One command to run, one to test. Everything installs into .venv on first use.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: install run demo test setup unit integration browser faults lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: install  ## the whole system in one process: SQLite file + in-process broker, http://127.0.0.1:8000
	$(BIN)/chatsessions run

demo: install  ## a scripted conversation across the three platforms, transcripts printed
	$(BIN)/chatsessions demo

test: install setup  ## every test: unit, integration, browser, then the fault suite (~12 min)
	$(BIN)/pytest -q
	$(BIN)/pytest -q -s -m faults tests/faults

setup:  ## start PostgreSQL, Redis and RabbitMQ if down; install chromium, chromedriver and pgbouncer if missing (root)
	tests/setup.sh

unit: install
	$(BIN)/pytest -q --ignore=tests/integration --ignore=tests/browser

browser: install setup  ## the web chat and session browser in headless Chromium
	$(BIN)/pytest -q tests/browser

integration: install setup
	$(BIN)/pytest -q tests/integration

faults: install setup  ## the fault suite: kills, pauses, restarts real processes under traffic (~8 min)
	$(BIN)/pytest -q -s -m faults tests/faults

clean:
	rm -rf $(VENV) *.egg-info chatsessions.db chatsessions.db-*

.PHONY: bench
bench: install  ## the benchmark: real processes + PostgreSQL/Redis on 127.0.0.1; SCENARIOS=e2e,ingress picks some, BENCH_OUT=path
	$(BIN)/chatsessions bench --scenarios "$(or $(SCENARIOS),all)" --out "$(or $(BENCH_OUT),bench-results.json)"
