# The two commands of the README: `make demo` (main job) and `make test` (test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The data root: $DIFFCSE_DATA_DIR if set, else data/ once its download scripts have run,
# else the shared benchmark data beside the checkout.
DIFFCSE_DATA_DIR ?= $(if $(wildcard data/senteval/downstream),data,../shared/data)
export DIFFCSE_DATA_DIR

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

# torch is pinned first: 2.13.0 is the CPU build on local disk; an unpinned torch pulls a
# multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/diffcse train --config configs/demo-minilm.yaml

test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python -m benchmarks.bench_train
	$(BIN)/python -m benchmarks.bench_eval

clean:
	rm -rf runs .pytest_cache .ruff_cache
