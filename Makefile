# One command to run, one to test. Everything installs into .venv on first use.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: install run demo test unit integration browser faults lint clean

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

test: install  ## every test: unit, integration, browser, then the fault suite (needs PostgreSQL, Redis, RabbitMQ, chromium; .ci/run provides them)
	$(BIN)/pytest -q
	$(BIN)/pytest -q -s -m faults tests/faults

unit: install
	$(BIN)/pytest -q --ignore=tests/integration --ignore=tests/browser

browser: install  ## the web chat and session browser in headless Chromium (apt-get install chromium chromium-driver)
	$(BIN)/pytest -q tests/browser

integration: install
	$(BIN)/pytest -q tests/integration

faults: install  ## the fault suite: kills, pauses, restarts real processes under traffic (~8 min)
	$(BIN)/pytest -q -s -m faults tests/faults

clean:
	rm -rf $(VENV) *.egg-info chatsessions.db chatsessions.db-*

.PHONY: bench
bench: install  ## the benchmark: real processes + PostgreSQL/Redis on 127.0.0.1; SCENARIOS=e2e,ingress picks some, BENCH_OUT=path
	$(BIN)/chatsessions bench --scenarios "$(or $(SCENARIOS),all)" --out "$(or $(BENCH_OUT),bench-results.json)"
