# Two commands on a fresh machine: `make train` and `make test`. Both create .venv if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?=
RUN ?= runs/session8
RESULT ?= results/session8-cpu

.PHONY: install train test lint format figures benchmark lab clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## train the assignment's recipe on CIFAR-10 (downloads to ./data; or DATA=path/to/cifar10.tar.gz)
train: $(STAMP)
	$(PY) -m eva_utils train --preset session8 --out $(RUN) $(if $(DATA),--data $(DATA)) $(ARGS)

## the whole suite: unit tests, CLI tests, real-data tests (if ../shared/data exists), notebooks under nbval
test: $(STAMP)
	EVA_SMOKE=1 $(PY) -m pytest --nbval-lax tests notebooks

lint: $(STAMP)
	$(PY) -m ruff check eva_utils tests benchmarks
	$(PY) -m ruff format --check eva_utils tests benchmarks

format: $(STAMP)
	$(PY) -m ruff format eva_utils tests benchmarks
	$(PY) -m ruff check --fix eva_utils tests benchmarks

## redraw every README image from the committed metrics.json and analysis.json (no training,
## no checkpoint); the gallery of mistakes reads the run's test set (or DATA=path/to/cifar10.tar.gz)
figures: $(STAMP)
	$(PY) -m eva_utils figures $(RESULT) --out images/ $(if $(DATA),--data $(DATA))

benchmark: $(STAMP)
	$(PY) benchmarks/throughput.py

lab: $(STAMP)
	$(PY) -m pip install -e ".[lab]"
	$(PY) -m jupyter lab notebooks/

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
