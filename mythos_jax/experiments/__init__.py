"""Experiments that test what looping buys, each trained by the project's own trainer.

An experiment (``harness.Experiment``) is a declarative list of arms (training configs: a
preset plus ``--set`` overrides) and an evaluation of each trained arm; ``harness.run`` trains
every arm in its own workdir (a rerun skips finished arms and resumes an interrupted one),
evaluates it, and writes ``results.json``, PNG plots and a Markdown table. The experiments:

  depth_extrapolation   E1: k-hop composition over a knowledge graph, hops beyond training
  position_control      E1b: E1's looped arms against controls of position (depth or position?)
  test_time_depth       E2: byte-level LM loss against test-time loops, L(T) fits
  stability             E3: learning-rate sweep of the injection forms, divergence and rho(A)
  looped_vs_standard    E4: a looped core against transformers of 2-8 unique layers
  inside_the_loop       E5: dense vs MoE and MLA vs GQA in the loop, MoE routing per iteration

Run them as ``mythos-jax experiment NAME [--arms a,b] [--seeds 0,1,2] [--quick] [--out DIR]``.
Each also has a pod preset (``harness.PodPreset``, ``pod``): the same arms at ~100M-1B
parameters on a TPU slice, run with ``--pod`` and checked with ``mythos-jax plan --experiment
NAME``.
"""

EXPERIMENTS = {
    "depth_extrapolation": "mythos_jax.experiments.depth_extrapolation",
    "position_control": "mythos_jax.experiments.position_control",
    "looped_vs_standard": "mythos_jax.experiments.looped_vs_standard",
    "test_time_depth": "mythos_jax.experiments.test_time_depth",
    "stability": "mythos_jax.experiments.stability",
    "inside_the_loop": "mythos_jax.experiments.inside_the_loop",
}


def get_experiment(name: str):
    """The ``Experiment`` called ``name``; unknown names raise ``ValueError`` listing them."""
    import importlib

    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {sorted(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name]).EXPERIMENT
