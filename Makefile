# cilia — one entry point for set-up, demo, tests and benchmarks.
VENV   := .venv
PY     := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: bootstrap demo test lint typecheck unit bench clean

bootstrap:
	@./scripts/bootstrap.sh

demo: bootstrap
	$(PY) -m cilia.demo

lint: bootstrap
	$(VENV)/bin/ruff check cilia services tests bench
	$(VENV)/bin/ruff format --check cilia services tests bench

typecheck: bootstrap
	$(VENV)/bin/mypy

test: lint typecheck
	$(PY) -m pytest -q

unit: bootstrap
	$(PY) -m pytest -q tests/unit

bench: bootstrap
	$(PY) bench/engine.py
	$(PY) bench/control_plane.py
	$(PY) bench/datapath.py
	$(PY) bench/cluster.py
	$(PY) bench/services.py
	$(PY) bench/l7proxy.py
	$(PY) bench/dnsproxy.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache bench/out
