# Entry points that work on a fresh machine (see README.md):
#   make train    set up the environment, run the main job: E1 in short (a looped model and
#                 the same model at one loop on k-hop composition, ~5 min on 2 CPU cores),
#                 checkpoints, the accuracy table by hops and test-time loops; rerun to resume
#   make train-lm the byte-level LM on the stdlib sources (~9 min), its depth curve
#   make test     set up the environment and run the test suite
#   make plan-pods every experiment's pod preset on its TPU slice: every arm compiled by libtpu
#                 ahead of time (no TPU; CI runs it after the tests), the largest arm of each
#                 experiment first, two at a time; libtpu's figures are kept beside the venv
#                 and reused for a program compiled before; after PLAN_BUDGET minutes no new
#                 compile starts and the arms left keep their estimate (named in the output)
#   make parity   convert a PyTorch OpenMythos model, print parity + speed
# The virtualenv lives outside the clone, keyed by a hash of the requirement files, so CI and
# later clones reuse it (torch from PyPI on Python 3.12 is the ~5 GB CUDA build).
SHELL := /bin/bash
VENV := $(shell bash .ci/venv.sh --path)
PY := $(VENV)/bin/python

WORKDIR ?= runs/khop
# Two pytest workers, one test file each at a time (module fixtures stay on one worker); the
# slowest files are named first, slowest first, so that the short ones fill the end.
SLOW_TESTS := tests/test_train.py tests/test_generate.py tests/test_experiments.py \
	tests/test_preemption.py tests/test_pod_presets.py \
	tests/test_experiment_looped_vs_standard.py tests/test_experiment_stability.py \
	tests/test_experiment_inside_the_loop.py \
	tests/test_loops.py tests/test_moe_dispatch.py tests/test_parallel.py \
	tests/test_checkpoints_load.py tests/test_checkpoints_training.py tests/test_loop_memory.py \
	tests/test_bench_moe.py tests/test_device_check.py tests/test_buckets.py tests/test_lm_eval.py
LM_WORKDIR ?= runs/cpu_small
PLAN_BUDGET ?= 30
PLAN_STORE ?= $(dir $(VENV))plan-store

.PHONY: venv test plan-pods parity bench train train-lm
venv:
	bash .ci/venv.sh

test: venv
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 $(SLOW_TESTS) tests

plan-pods: venv
	$(VENV)/bin/mythos-jax plan --experiment all --jobs 2 --compile-budget $(PLAN_BUDGET) \
		--store $(PLAN_STORE)

train: venv
	$(VENV)/bin/mythos-jax experiment depth_extrapolation --arms looped_random,single_loop --seeds 0 \
		--out $(WORKDIR)

train-lm: venv
	$(VENV)/bin/mythos-jax train --config cpu_small --workdir $(LM_WORKDIR)

parity: venv
	$(VENV)/bin/mythos-jax parity

bench: venv
	$(PY) experiments/bench_vs_torch.py
