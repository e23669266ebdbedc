# Entry points that work on a fresh machine (see README.md):
#   make train    set up the environment, train a small looped model on built-in data (CPU,
#                 ~10 min), checkpoint, print the depth curve; rerun to resume
#   make test     set up the environment and run the test suite
#   make parity   convert a PyTorch OpenMythos model, print parity + speed
# The virtualenv lives outside the clone, keyed by a hash of the requirement files, so CI and
# later clones reuse it (torch from PyPI on Python 3.12 is the ~5 GB CUDA build).
SHELL := /bin/bash
VENV := $(shell bash .ci/venv.sh --path)
PY := $(VENV)/bin/python

WORKDIR ?= runs/cpu_small

.PHONY: venv test parity bench train
venv:
	bash .ci/venv.sh

test: venv
	$(PY) -m pytest -q --durations=15 tests

train: venv
	$(VENV)/bin/mythos-jax train --config cpu_small --workdir $(WORKDIR)

parity: venv
	$(VENV)/bin/mythos-jax parity

bench: venv
	$(PY) experiments/bench_vs_torch.py
