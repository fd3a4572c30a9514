# `make demo` and `make test` do all set-up themselves on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
OUT ?= runs/demo
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test format install mlflow clean

install: $(STAMP)

# torch 2.13.0 (CPU) first: a bare `torch` requirement resolved alone would pull a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0 -c constraints.txt
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tprl pipeline --out $(OUT)

# The MLflow UI over OUT's store, on 127.0.0.1 only (PORT=5000).
PORT ?= 5000
mlflow: $(STAMP)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow server \
		--backend-store-uri sqlite:///$(abspath $(OUT))/mlflow.db --host 127.0.0.1 --port $(PORT)

# Lint and format check first (ruff, configured in pyproject.toml), then the whole suite.
LINTED := tprl_ray tests pipelines
test: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs

# Apply ruff's fixes and formatting.
format: $(STAMP)
	$(VENV)/bin/ruff check --fix $(LINTED)
	$(VENV)/bin/ruff format $(LINTED)
