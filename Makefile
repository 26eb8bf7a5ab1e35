# Two commands on a fresh machine: `make train` and `make test`. Both create .venv if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?=
RUN ?= runs/session8
RESULT ?= results/session8-h100
# the README's "Does Ghost BatchNorm help here?" figure
COMPARE ?= results/session8-h100 results/session8-bn-nodropout-h100

.PHONY: install train ablation test lint format figures notebook-outputs release-asset benchmark lab clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## train the assignment's recipe on CIFAR-10 (downloads to ./data; or DATA=path/to/cifar10.tar.gz)
train: $(STAMP)
	$(PY) -m eva_utils train --preset session8 --out $(RUN) $(if $(DATA),--data $(DATA)) $(ARGS)

## the ablation: GBN with 1, 2, 4 and 8 splits x dropout 0 and 0.1 x seeds 1, 2, 3 (24 session8
## runs on all of the data) into $(ABLATION); the same command continues a stopped sweep;
## PARALLEL=N trains N runs at a time (benchmarks/gpu_suite.sh measures the best N)
ABLATION ?= sweeps/ablation
PARALLEL ?= 1
ablation: $(STAMP)
	$(PY) -m eva_utils sweep --preset session8 --grid num_splits=1,2,4,8 --grid dropout=0,0.1 \
		--seeds 1,2,3 --out $(ABLATION) --parallel $(PARALLEL) $(if $(DATA),--data $(DATA)) $(ARGS)

## the whole suite: unit tests, CLI tests, real-data tests (if ../shared/data exists), notebooks under nbval;
## pytest-xdist workers (one more than cores: tests/conftest.py), each file (a notebook's cells, a
## module's shared trained run) on one, the longest files first (LONG_FILES, kept in that order)
test: $(STAMP)
	EVA_SMOKE=1 $(PY) -m pytest -n auto --dist loadfile --no-loadscope-reorder --nbval-lax tests notebooks

lint: $(STAMP)
	$(PY) -m ruff check eva_utils tests benchmarks tools
	$(PY) -m ruff format --check eva_utils tests benchmarks tools

format: $(STAMP)
	$(PY) -m ruff format eva_utils tests benchmarks tools
	$(PY) -m ruff check --fix eva_utils tests benchmarks tools

## redraw every README image from the committed metrics.json and analysis.json (no training,
## no checkpoint); the gallery of mistakes reads the run's test set (or DATA=path/to/cifar10.tar.gz)
figures: $(STAMP)
	$(PY) -m eva_utils figures $(RESULT) --out images/ $(if $(DATA),--data $(DATA))
	$(PY) -m eva_utils compare $(COMPARE) --out images/gbn_vs_bn.png

## store real outputs in the notebooks: the main one's lesson run on this CPU (LESSON = True:
## 3 epochs, 5,000/1,000 images) and the receptive-field one; DATA is the JPEG copy, relative to here
NOTEBOOK_DATA ?= ../shared/data/cifar10-jpg.tar.gz
notebook-outputs: $(STAMP)
	rm -rf notebooks/runs
	cd notebooks && EVA_DATA=../$(NOTEBOOK_DATA) CUDA_VISIBLE_DEVICES= \
		../$(PY) -m jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.timeout=1800 session8_resnet18_gbn.ipynb receptive_fields.ipynb
	$(PY) notebooks/strip_progress_bars.py notebooks/session8_resnet18_gbn.ipynb \
		notebooks/receptive_fields.ipynb

## the trained model's release asset: the reference run's best.pt with fp16 weights (22.4 MB),
## written into dist/ (ignored; never commit it) with its size and sha256, which must be
## eva_utils/pretrained.py's SHA256; attach it to the release named there
REFERENCE_CHECKPOINT ?= ../shared/reference-runs/session8-h100/best.pt
release-asset: $(STAMP)
	$(PY) tools/release_asset.py $(REFERENCE_CHECKPOINT) --out dist

benchmark: $(STAMP)
	$(PY) benchmarks/throughput.py

lab: $(STAMP)
	$(PY) -m pip install -e ".[lab]"
	$(PY) -m jupyter lab notebooks/

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
