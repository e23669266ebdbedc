# Two entry points that work on a fresh machine (see README.md):
#   make parity   set up the environment, convert a PyTorch OpenMythos model, print parity + speed
#   make test     set up the environment and run the test suite
# The virtualenv lives outside the clone, keyed by a hash of the requirement files, so CI and
# later clones reuse it (torch from PyPI on Python 3.12 is the ~5 GB CUDA build).
SHELL := /bin/bash
VENV := $(shell bash .ci/venv.sh --path)
PY := $(VENV)/bin/python

.PHONY: venv test test-all parity bench
venv:
	bash .ci/venv.sh

test: venv
	$(PY) -m pytest -q tests

parity: venv
	$(VENV)/bin/mythos-jax parity

bench: venv
	$(PY) experiments/bench_vs_torch.py
