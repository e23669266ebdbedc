"""Run an experiment: train its arms with the project's trainer, evaluate, write results.

``mythos-jax experiment NAME [--arms a,b] [--quick | --pod] [--set k=v ...] [--out DIR]
[--seeds 0,1,2] [--report-only]``; NAME is one of ``mythos_jax.experiments.EXPERIMENTS``.
Results go to ``experiments/results/NAME/`` (``results.json``, ``table.md``, plots) of the
clone mythos_jax runs from (else of the current folder); a full run into that folder also
refreshes the experiment's table in ``experiments/README.md``. A rerun skips finished (arm,
seed) pairs and resumes an interrupted one; ``--report-only`` trains nothing and reports the
finished ones. ``--pod`` runs the experiment's pod preset (``mythos_jax.experiments.pod``)
into ``experiments/results/NAME-pod/``; ``--set`` overrides every arm's config (a corpus path,
a mesh).
"""

from __future__ import annotations

import argparse
import os
import shlex

from mythos_jax.experiments import EXPERIMENTS, get_experiment

# The clone's experiments/ folder when mythos_jax runs from one (editable install), else ./
_CLONE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "experiments")
EXPERIMENTS_DIR = os.path.normpath(_CLONE) if os.path.isdir(_CLONE) else "experiments"
RESULTS_ROOT = os.path.join(EXPERIMENTS_DIR, "results")
README = os.path.join(EXPERIMENTS_DIR, "README.md")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(EXPERIMENTS), help="the experiment")
    parser.add_argument("--arms", help="comma-separated arm names (default: all but the "
                        "experiment's optional ones)")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--quick", action="store_true",
                       help="a few steps per arm: checks the pipeline, not the science")
    scale.add_argument("--pod", action="store_true",
                       help="the pod preset: models of ~100M-1B parameters on a TPU slice "
                            "(experiments/README.md)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override every arm's config, e.g. --set 'data.paths=[corpus]' "
                             "(repeatable)")
    parser.add_argument("--out", help="output folder (default: experiments/results/NAME, "
                                      "or .../NAME-quick with --quick, .../NAME-pod with "
                                      "--pod)")
    parser.add_argument("--seeds", help="comma-separated seeds, each a full run of the arms "
                                        "(model init, loop draws, data order; default: the "
                                        "experiment's, the first only with --quick)")
    parser.add_argument("--seed", type=int, help="one seed (the same as --seeds N)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: tables and plots from the arms finished so far")


def run(args: argparse.Namespace) -> int:
    from mythos_jax.experiments import harness
    from mythos_jax.platforms import use_compilation_cache
    from mythos_jax.train.trainer import PREEMPTED_EXIT

    use_compilation_cache()
    experiment = get_experiment(args.name)
    if args.pod:
        experiment = experiment.at_pod_scale()
    experiment = experiment.with_overrides(tuple(args.set))
    suffix = "-quick" if args.quick else "-pod" if args.pod else ""
    default_out = os.path.join(RESULTS_ROOT, args.name + suffix)
    out = args.out or default_out
    arms = None if args.arms is None else [a.strip() for a in args.arms.split(",") if a.strip()]
    seeds = _seeds(args)
    command = " ".join(["mythos-jax experiment", args.name,
                        *(["--arms", args.arms] if args.arms else []),
                        *(["--seeds", ",".join(map(str, seeds))] if seeds else []),
                        *(["--quick"] if args.quick else []), *(["--pod"] if args.pod else []),
                        *(f"--set {shlex.quote(text)}" for text in args.set),
                        *(["--out", args.out] if args.out else [])])
    try:
        results = harness.run(experiment, out, arms, args.quick, seeds, command,
                              args.report_only)
    except harness.ExperimentPreempted as err:
        print(err, flush=True)
        return PREEMPTED_EXIT
    if out == os.path.join(RESULTS_ROOT, args.name) and arms is None and os.path.exists(README):
        harness.include_in_readme(README, args.name, results["table"])
        print(f"{README}: {args.name} table updated")
    return 0


def _seeds(args: argparse.Namespace) -> list[int] | None:
    """The seeds asked for (--seeds or --seed), None for the experiment's own."""
    if args.seeds is not None and args.seed is not None:
        raise ValueError("give --seeds or --seed, not both")
    if args.seed is not None:
        return [args.seed]
    if args.seeds is None:
        return None
    try:
        return [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") \
            from None
