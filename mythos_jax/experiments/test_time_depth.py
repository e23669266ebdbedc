"""E2, test-time depth (Parcae's law; OpenMythos #28 and PR #58): byte-level LM on the stdlib.

Four arms of the ``cpu_small`` model (``make train``'s, 8 experts, OpenMythos numerics), each
trained for the same steps with mean depth 4: ``fixed_act`` (4 loops, OpenMythos ACT),
``fixed_no_act`` (4 loops, ACT off), ``random_depth`` (Poisson(4) loops, ACT off, backprop
through the last 4: the PR #58 recipe) and ``parcae_random`` (the same with Parcae's injection,
prelude norm and read-out). Held-out loss at test loops 1 .. 32, and per arm the fit
``L(T) = L_inf + Z exp(-z T)`` with its R^2.
"""

from __future__ import annotations

import os

import numpy as np

from mythos_jax.experiments import plots
from mythos_jax.experiments.fit import fit_saturating_exponential
from mythos_jax.experiments.harness import (Arm, ArmRun, Experiment, loss_curve,
                                            mean_training_loops, report_head)

TEST_LOOPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
TRAIN_LOOPS = 4

BASE = ("steps=800", "optim.warmup_steps=50", "checkpoint.every=400", "log.every=25",
        "log.progress=false", "log.tensorboard=false", "eval.every=0", "eval.batches=4",
        f"eval.loops={list(TEST_LOOPS)}")
QUICK = ("steps=6", "optim.warmup_steps=2", "log.every=3", "checkpoint.every=3",
         "data.seq_len=32", "eval.batches=1", "eval.loops=[1,2,4,8]", "data.eval_examples=16")
RANDOM = ("loops.schedule=poisson", f"loops.mean={TRAIN_LOOPS}", "loops.max_loops=16",
          f"loops.backprop_depth={TRAIN_LOOPS}", "model.act=off")
FIXED = ("loops.schedule=fixed", f"loops.n={TRAIN_LOOPS}", f"loops.max_loops={TRAIN_LOOPS}",
         "loops.backprop_depth=null")

ARMS = (
    Arm("fixed_act", (*FIXED, "model.act=openmythos"), "4 loops, OpenMythos ACT"),
    Arm("fixed_no_act", (*FIXED, "model.act=off"), "4 loops, ACT off"),
    Arm("random_depth", RANDOM, "Poisson(4) loops, ACT off, backprop through the last 4"),
    Arm("parcae_random", (*RANDOM, "model.injection=parcae", "model.prelude_norm=true",
                          "model.readout=true"),
        "as random_depth with Parcae injection, prelude norm and read-out"),
)


def evaluate(run: ArmRun) -> dict:
    """Held-out loss by test loops and its saturating-exponential fit."""
    loss = loss_curve(run.train_report, "heldout")
    fit = fit_saturating_exponential([int(t) for t in loss], list(loss.values()))
    return {"train_mean_loops": mean_training_loops(run), "loss": loss, "fit": fit}


def report(results: dict, out: str) -> str:
    arms = results["arms"]
    results["targets"] = targets = _targets(arms)
    plots.curves({name: ([int(t) for t in a["loss"]], list(a["loss"].values()))
                  for name, a in arms.items()}, os.path.join(out, "loss_by_loops.png"),
                 "E2 held-out loss (nats/byte) by test-time loops; dashed: L_inf + Z exp(-zT)",
                 "test-time loops", "held-out loss", logx=True,
                 fitted={name: _law(a["fit"]) for name, a in arms.items()})
    columns = list(next(iter(arms.values()))["loss"])
    lines = report_head(results, targets)
    lines += ["", "Held-out loss (nats/byte) by test-time loops, and the fit:", "",
              "| arm | mean train loops | " + " | ".join(columns) + " | L_inf | Z | z | R^2 |",
              "|---" * (len(columns) + 6) + "|"]
    for name, a in arms.items():
        f = a["fit"]
        lines.append(f"| {name} | {a['train_mean_loops']:.2f} | "
                     + " | ".join(f"{v:.4f}" for v in a["loss"].values())
                     + f" | {f['L_inf']:.4f} | {f['Z']:.3f} | {f['z']:.3f} | {f['r2']:.3f} |")
    lines += ["", "![loss by loops](loss_by_loops.png)"]
    return "\n".join(lines)


def _law(fit: dict):
    return lambda t: fit["L_inf"] + fit["Z"] * np.exp(-fit["z"] * t)


def _targets(arms: dict) -> list[dict]:
    found = []
    for name in ("random_depth", "parcae_random"):
        if name not in arms:
            continue
        a = arms[name]
        mu = a["train_mean_loops"]
        window = {t: v for t, v in a["loss"].items() if mu <= int(t) <= 4 * mu}
        lowest = min(a["loss"].values())
        worst = max(window.values()) / lowest - 1 if window else float("nan")
        found.append({"claim": f"{name}: loss within 0.5% of its minimum from mu to 4 mu "
                               f"(mu = {mu:.1f})",
                      "ours": f"worst {worst:+.2%} over T in {sorted(map(int, window))}",
                      "met": bool(window) and worst <= 0.005})
        found.append({"claim": f"{name}: the fit L_inf + Z exp(-zT) has R^2 > 0.95",
                      "ours": f"R^2 = {a['fit']['r2']:.3f}", "met": a["fit"]["r2"] > 0.95})
    for name in ("fixed_act", "fixed_no_act"):
        if name not in arms:
            continue
        loss = arms[name]["loss"]
        beyond = {t: v for t, v in loss.items() if int(t) > TRAIN_LOOPS}
        rise = max(beyond.values()) / loss[str(TRAIN_LOOPS)] - 1 if beyond else float("nan")
        found.append({"claim": f"{name}: V shape, the loss rises beyond the training depth "
                               "(OpenMythos #28)",
                      "ours": f"largest rise beyond {TRAIN_LOOPS} loops {rise:+.1%} "
                              f"(at {max(beyond, key=beyond.get)} loops)",
                      "met": rise > 0.005})
    return found


EXPERIMENT = Experiment(
    name="test_time_depth",
    claim="Random-depth training without ACT gives a loss that falls with test-time loops and "
          "stays flat far beyond the training depth; fixed depth with ACT does not",
    base="cpu_small", base_overrides=BASE, quick_overrides=QUICK, arms=ARMS,
    evaluate=evaluate, report=report, quick_arms=("parcae_random",))
