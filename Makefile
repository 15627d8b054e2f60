# Two commands a user needs on a fresh machine with Python 3.11:
#   make quickstart   set up, train on the embedded EMT data, evaluate, relax
#   make test         set up and run the test suite (CPU only)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mlpot-installed
TORCH_VERSION := 2.13.0
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
RUN    ?= runs/quickstart

.PHONY: setup quickstart test test-slow lint clean

setup: $(STAMP)

# torch goes in first, pinned, so that no later requirement pulls a CUDA build onto a CPU machine.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifeq ($(HAS_CUDA),1)
	$(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[dev,gpu]"
else
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[dev,gpu]"
endif
	$(PY) -m pip install -q -e ".[d3,phonons,wandb]"
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/mlpot train configs/quickstart.yaml --set output=$(RUN)
	$(VENV)/bin/mlpot eval --model $(RUN)/model.pt --data $(RUN)/data/test.xyz
	$(VENV)/bin/mlpot relax $(RUN)/data/relax_start.xyz --model $(RUN)/model.pt --fmax 0.01 --cell --output $(RUN)/relaxed.xyz

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 -m "not slow" tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

lint: $(STAMP)
	$(VENV)/bin/ruff check mlpot kernels tests scripts

clean:
	rm -rf $(VENV) runs .pytest_cache
