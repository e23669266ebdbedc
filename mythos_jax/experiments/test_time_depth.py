"""E2, test-time depth (Parcae's law; OpenMythos #28 and PR #58): byte-level LM on the stdlib.

Five arms of the ``cpu_small`` model (``make train-lm``'s, 8 experts, OpenMythos numerics),
each trained for the same steps and tokens, at seeds 0, 1, 2: ``fixed_act`` (4 loops,
OpenMythos ACT), ``fixed_no_act`` (4 loops, ACT off), ``random_depth`` and ``parcae_random``
(Parcae's recipe: a Poisson(4) loop count drawn per sequence, ACT off, backprop through the
last ceil(mu / 2) = 2 loops; the second with Parcae's injection, prelude norm and read-out) and
``non_looped`` (the same parameters at one loop: the baseline a looped model must beat).
Held-out loss (token-weighted) at test loops 1 .. 32, and per arm and seed the fit
``L(T) = L_inf + Z exp(-z T)`` with its R^2.
"""

from __future__ import annotations

import math
import os

import numpy as np

from mythos_jax.experiments import plots, pod
from mythos_jax.experiments.fit import fit_saturating_exponential
from mythos_jax.experiments.harness import (Arm, ArmRun, Experiment, PodPreset, loss_curve,
                                            mean_training_loops, report_head)
from mythos_jax.experiments.seeds import mean_matrix, seed_values, spread

TEST_LOOPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
TRAIN_LOOPS = 4

RECIPE = ("log.progress=false", "log.tensorboard=false", "eval.every=0",
          f"eval.loops={list(TEST_LOOPS)}")
BASE = ("steps=800", "optim.warmup_steps=50", "checkpoint.every=400", "log.every=25",
        "eval.batches=4", *RECIPE)
QUICK = ("steps=6", "optim.warmup_steps=2", "log.every=3", "checkpoint.every=3",
         "data.seq_len=32", "eval.batches=1", "eval.loops=[1,2,4,8]", "data.eval_examples=16")
RANDOM = ("loops.schedule=poisson", f"loops.mean={TRAIN_LOOPS}", "loops.max_loops=16",
          "loops.per_sequence=true", f"loops.backprop_depth={math.ceil(TRAIN_LOOPS / 2)}",
          "model.act=off")
FIXED = ("loops.schedule=fixed", f"loops.n={TRAIN_LOOPS}", f"loops.max_loops={TRAIN_LOOPS}",
         "loops.backprop_depth=null")

ARMS = (
    Arm("fixed_act", (*FIXED, "model.act=openmythos"), "4 loops, OpenMythos ACT"),
    Arm("fixed_no_act", (*FIXED, "model.act=off"), "4 loops, ACT off"),
    Arm("random_depth", RANDOM, "Poisson(4) loops per sequence, ACT off, backprop through "
                                "the last 2"),
    Arm("parcae_random", (*RANDOM, "model.injection=parcae", "model.prelude_norm=true",
                          "model.readout=true"),
        "as random_depth with Parcae injection, prelude norm and read-out"),
    Arm("non_looped", ("loops.schedule=fixed", "loops.n=1", "loops.max_loops=1",
                       "loops.backprop_depth=null", "model.act=off", "eval.loops=[1]"),
        "the same parameters at 1 loop (non-looped baseline)"),
)


def evaluate(run: ArmRun) -> dict:
    """Held-out loss by test loops and, over 3 or more loop counts, its saturating-exponential
    fit."""
    loss = loss_curve(run.train_report, "heldout")
    result = {"train_mean_loops": mean_training_loops(run), "loss": loss}
    if len(loss) >= 3:
        result["fit"] = fit_saturating_exponential([int(t) for t in loss], list(loss.values()))
    return result


def report(results: dict, out: str) -> str:
    """Targets (every seed), the loss table (mean (min-max) over seeds) and fits, the plot of
    the seed means with the first seed's fit."""
    names = list(results["arms"])
    results["targets"] = targets = _targets(results, names)
    curves = {name: mean_matrix(seed_values(results, name, lambda a: {"loss": a["loss"]}))["loss"]
              for name in names}
    plots.curves({name: ([int(t) for t in c], list(c.values())) for name, c in curves.items()},
                 os.path.join(out, "loss_by_loops.png"),
                 "E2 held-out loss (nats/byte, mean over seeds) by test-time loops; dashed: "
                 "L_inf + Z exp(-zT) of the first seed", "test-time loops", "held-out loss",
                 logx=True, fitted={name: _law(a["fit"]) for name, a in results["arms"].items()
                                    if len(a["loss"]) >= 3})
    lines = report_head(results, targets)
    lines += ["", "Held-out loss (nats/byte) by test-time loops, mean (min-max) over seeds, and "
                  "the fit's R^2 per seed:", "",
              "| arm | mean train loops | " + " | ".join(map(str, TEST_LOOPS)) + " | R^2 |",
              "|---" * (len(TEST_LOOPS) + 3) + "|"]
    for name in names:
        losses = seed_values(results, name, lambda a: a["loss"])
        cells = [spread([c[str(t)] for c in losses], ".4f") if str(t) in losses[0] else "-"
                 for t in TEST_LOOPS]
        r2 = [f"{a['fit']['r2']:.2f}" for a in seed_values(results, name, lambda a: a)
              if "fit" in a]
        loops = spread(seed_values(results, name, lambda a: a["train_mean_loops"]), ".2f")
        lines.append(f"| {name} | {loops} | " + " | ".join(cells) + f" | {', '.join(r2) or '-'} |")
    lines += ["", "![loss by loops](loss_by_loops.png)"]
    return "\n".join(lines)


def _law(fit: dict):
    return lambda t: fit["L_inf"] + fit["Z"] * np.exp(-fit["z"] * t)


def _flat_window(arm: dict) -> float:
    """The worst loss from mu to 4 mu relative to the arm's minimum (nan without a window)."""
    mu = arm["train_mean_loops"]
    window = [v for t, v in arm["loss"].items() if mu <= int(t) <= 4 * mu]
    return max(window) / min(arm["loss"].values()) - 1 if window else float("nan")


def _v_rise(arm: dict) -> float:
    """The largest rise of the loss beyond the training depth, relative to it there."""
    loss = arm["loss"]
    beyond = [v for t, v in loss.items() if int(t) > TRAIN_LOOPS]
    return max(beyond) / loss[str(TRAIN_LOOPS)] - 1 if beyond else float("nan")


def _targets(results: dict, names: list[str]) -> list[dict]:
    found = []
    for name in ("random_depth", "parcae_random"):
        if name not in names:
            continue
        flat = seed_values(results, name, _flat_window)
        found.append({"claim": f"{name}: loss within 0.5% of its minimum from mu to 4 mu",
                      "ours": f"worst {spread(flat, '+.2%')} (mean (min-max) over seeds)",
                      "met": bool(max(flat) <= 0.005)})
        r2 = seed_values(results, name, lambda a: a["fit"]["r2"])
        found.append({"claim": f"{name}: the fit L_inf + Z exp(-zT) has R^2 > 0.95",
                      "ours": f"R^2 {spread(r2, '.3f')}", "met": bool(min(r2) > 0.95)})
        if "non_looped" in names:
            best = seed_values(results, name, lambda a: min(a["loss"].values()))
            base = seed_values(results, "non_looped", lambda a: a["loss"]["1"])
            found.append({"claim": f"{name}: below the non-looped model of equal parameters",
                          "ours": f"best {spread(best, '.4f')} vs {spread(base, '.4f')}",
                          "met": bool(max(best) < min(base))})
    for name in ("fixed_act", "fixed_no_act"):
        if name in names:
            rise = seed_values(results, name, _v_rise)
            found.append({"claim": f"{name}: V shape, the loss rises beyond the training depth "
                                   "(OpenMythos #28)",
                          "ours": f"largest rise beyond {TRAIN_LOOPS} loops {spread(rise, '+.1%')}",
                          "met": bool(min(rise) > 0.005)})
    return found


EXPERIMENT = Experiment(
    name="test_time_depth",
    claim="Random-depth training without ACT gives a loss that falls with test-time loops and "
          "stays flat far beyond the training depth; fixed depth with ACT does not",
    base="cpu_small", base_overrides=BASE, quick_overrides=QUICK, arms=ARMS,
    pod=PodPreset(pod.BASE, (*pod.TRAINING, *pod.LM_DATA, *pod.MOE_MYTHOS_1B, "steps=20000",
                             *RECIPE), ARMS, pod.TOPOLOGY, pod.MESH),
    evaluate=evaluate, report=report, quick_arms=("parcae_random", "non_looped"),
    seeds=(0, 1, 2))
