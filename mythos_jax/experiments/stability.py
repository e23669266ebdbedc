"""E3, stability: a learning-rate and clipping sweep of the injection forms (Parcae's stability
table in miniature), with an unstable baseline that can diverge.

Every arm trains the same model with the same recipe; only the injection, the learning rate
and the clipping move. Byte-level LM on the stdlib (seq 64 x batch 16) with ``tiny_mla``
(dim 64, 4 experts, ``max_loop_iters=8``), Parcae's prelude norm and read-out for every
injection, 8 fixed loops with backprop through all of them (no truncation), ACT off.
Arms ``<injection>@x<m>`` and ``<injection>@x<m>_noclip`` (the comma-separated ``--arms`` of the
CLI rules out a comma in a name), each at seeds 0 and 1:
  injection "openmythos"  LTI, ``h = A h + B e + u`` with A in (0, 1)
            "parcae"      ``u = A h + dt e B^T``, A in (0, 1), then the block
            "additive"    ``h = h + e + u``: A = 1, fixed
            "free"        ``h = A h + e B^T + u`` with A (D,) and B (D, D) learned and
                          unconstrained, A from 1 and B from 0.1 I: Parcae's unstable baseline
  learning rate  m x 3e-3 for m in 1, 3, 10, 30 (warmup 30 steps, cosine decay)
  clipping       global norm 1 (the trainer's default) or none ("_noclip")

Recorded per arm (``evaluate``), from every training step in metrics.jsonl, not the last batch:
  spikes            steps whose (finite) loss is above 2x the running minimum of the losses
                    before it
  diverged          any of (``diverged_because``): a non-finite step (loss or gradient; the
                    trainer skips it), the trainer stopping on non-finite steps, the held-out
                    loss at 8 loops of the final checkpoint not finite or above the first
                    step's loss, the last tenth of the steps averaging above 2x the lowest loss
  max_rho           the largest rho(A) logged at any step (``max_i A_i``, the trainer's
                    figure); ``rho_crossed_1``: above 1 at some step
  final_loss        the mean training loss of the last tenth of the steps
  heldout           held-out loss of the final checkpoint at 8, 16, 32 and 64 loops
  state_rms_by_loop RMS of h after each loop 1..64 of the final checkpoint, first held-out batch
and the trajectories of loss, rho(A) and RMS(h) by step.
"""

from __future__ import annotations

import math
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mythos_jax.experiments import plots, pod
from mythos_jax.experiments.harness import (Arm, ArmRun, Experiment, PodPreset, loss_curve,
                                            report_head)
from mythos_jax.modes import Injection
from mythos_jax.train import data as data_lib
from mythos_jax.train.evaluate import evaluate as evaluate_depths
from mythos_jax.train.step import model_from_state

BASE_LR = 3e-3
MULTIPLIERS = (1, 3, 10, 30)
TRAIN_LOOPS = 8
HELDOUT_LOOPS = (8, 16, 32, 64)
SPIKE_FACTOR = 2.0
TAIL = 0.1              # the share of the last steps whose mean loss is "final"
SEEDS = (0, 1)
STEPS = 200
NOCLIP = "_noclip"
STABLE = (Injection.OPENMYTHOS, Injection.PARCAE)

RECIPE = ("model.act=off", f"model.max_loop_iters={TRAIN_LOOPS}", "model.prelude_norm=true",
          "model.readout=true", "loops.schedule=fixed", f"loops.n={TRAIN_LOOPS}",
          f"loops.max_loops={TRAIN_LOOPS}", "loops.backprop_depth=null",
          "optim.max_nonfinite=20", "log.every=1", "log.progress=false",
          "log.tensorboard=false", f"eval.loops={list(HELDOUT_LOOPS)}")
BASE = (f"steps={STEPS}", "model.variant=tiny_mla", "data.source=stdlib", "data.seq_len=64",
        "data.batch_size=16", "optim.warmup_steps=30", f"checkpoint.every={STEPS // 4}",
        "eval.batches=2", *RECIPE)
POD_LR = 3e-4           # the pod preset's x1: the mythos_1b preset's learning rate
POD_STEPS = 5000
QUICK = ("steps=4", "optim.warmup_steps=1", "checkpoint.every=4", "data.seq_len=32",
         "eval.batches=1", "data.eval_examples=16", f"eval.loops=[{TRAIN_LOOPS},16]")


def _arm(injection: str, multiplier: int, clip: bool, base_lr: float) -> Arm:
    lr = base_lr * multiplier
    return Arm(f"{injection}@x{multiplier}{'' if clip else NOCLIP}",
               (f"model.injection={injection}", f"optim.lr={lr:g}",
                *(() if clip else ("optim.clip_norm=0",))),
               f"injection {injection}, lr {lr:g}, {'clipped at norm 1' if clip else 'no clip'}")


def arms(base_lr: float) -> tuple[Arm, ...]:
    """Every injection x clipping x learning rate ``m * base_lr`` (m in ``MULTIPLIERS``)."""
    return tuple(_arm(injection, m, clip, base_lr) for injection in Injection.names()
                 for clip in (True, False) for m in MULTIPLIERS)


ARMS = arms(BASE_LR)


def split_name(name: str) -> tuple[str, str]:
    """``"free@x30_noclip"`` -> ("free", "x30_noclip"): the injection and the setting."""
    injection, setting = name.split("@")
    return injection, setting


# ---------------------------------------------------------------------------- one arm
def spike_steps(steps: list[int], losses: list[float]) -> list[int]:
    """The steps whose finite loss is above ``SPIKE_FACTOR`` x the lowest finite loss before."""
    found, lowest = [], math.inf
    for step, loss in zip(steps, losses):
        if math.isfinite(loss):
            if loss > SPIKE_FACTOR * lowest:
                found.append(step)
            lowest = min(lowest, loss)
    return found


def tail_mean(losses: list[float]) -> float:
    """The mean finite loss of the last ``TAIL`` of the steps (NaN if none is finite)."""
    tail = [x for x in losses[-max(1, round(TAIL * len(losses))):] if math.isfinite(x)]
    return float(np.mean(tail)) if tail else math.nan


def divergence_reasons(run: ArmRun, losses: list[float], finite: list[bool],
                       heldout: dict[str, float] | None) -> list[str]:
    """Why the arm counts as diverged (empty: it did not); see the module docstring."""
    reasons = []
    if not all(finite):
        reasons.append(f"{finite.count(False)} non-finite step(s)")
    if run.diverged is not None:
        reasons.append("the trainer stopped")
    at_training_depth = math.nan if heldout is None else heldout[str(TRAIN_LOOPS)]
    if not at_training_depth <= losses[0]:
        reasons.append(f"held-out loss {at_training_depth:.3g} at {TRAIN_LOOPS} loops")
    lowest = min((x for x in losses if math.isfinite(x)), default=math.nan)
    if not tail_mean(losses) <= SPIKE_FACTOR * lowest:
        reasons.append("ended above 2x its lowest loss")
    return reasons


def heldout_losses(run: ArmRun) -> dict[str, float] | None:
    """``{loops: held-out loss}`` of the final checkpoint at ``eval.loops`` (the trainer's
    final evaluation; evaluated here when it stopped early; None without a checkpoint)."""
    if "depth_curve" in run.train_report:
        return loss_curve(run.train_report, "heldout")
    if run.state is None:
        return None
    return loss_curve({"depth_curve": evaluate_depths(run.plan, run.state)}, "heldout")


def state_rms_by_loop(run: ArmRun) -> list[float] | None:
    """RMS of h (over B, T, D) after each loop 1..max(eval.loops) of the final checkpoint on
    the first held-out batch (None without a checkpoint)."""
    if run.state is None:
        return None
    model = model_from_state(run.plan, run.state)
    model.eval()
    ids = jnp.asarray(data_lib.eval_batches(run.cfg.data, "heldout")[0]["inputs"])
    n_loops = max(run.cfg.eval.loops)

    def rms(m, ids):
        h = m(ids, n_loops, trace=True).loops.h                  # (n, B, T, D)
        return jnp.sqrt(jnp.mean(jnp.square(h), axis=(1, 2, 3)))

    with run.plan.context():
        return [float(x) for x in nnx.jit(rms)(model, ids)]


def evaluate(run: ArmRun) -> dict:
    """Spikes, divergence, rho(A), losses and the state's RMS by loop (module docstring)."""
    records = [m for m in run.metrics if "loss" in m]
    steps, losses = [m["step"] for m in records], [m["loss"] for m in records]
    finite = [bool(m["finite"]) for m in records]
    rho = [m["rho_A"] for m in records]
    heldout = heldout_losses(run)
    spikes = spike_steps(steps, losses)
    reasons = divergence_reasons(run, losses, finite, heldout)
    return {"diverged": bool(reasons), "diverged_because": reasons, "spikes": len(spikes),
            "spike_steps": spikes, "nonfinite_steps": finite.count(False),
            "initial_loss": losses[0], "final_loss": tail_mean(losses),
            "max_rho": max(rho), "rho_crossed_1": max(rho) > 1.0, "final_rho": rho[-1],
            "heldout": heldout, "state_rms_by_loop": state_rms_by_loop(run),
            "trajectory": {"step": steps, "loss": losses, "rho_A": rho,
                           "state_rms": [m["state_rms"] for m in records]},
            "stopped": run.diverged}


# ---------------------------------------------------------------------------- report
def per_seed(results: dict, arm: str, pick) -> list:
    """``pick(arm result)`` at every seed, in the order the seeds ran (None where the arm
    has not finished at that seed: a partial report)."""
    return [pick(one["arms"][arm]) if arm in one["arms"] else None
            for one in results["seeds"].values()]


def _cell(values: list, fmt) -> str:
    """Per-seed values joined by "; " (seed order)."""
    return "; ".join("-" if v is None else fmt(v) for v in values)


def report(results: dict, out: str) -> str:
    """The claims (per seed), a summary per injection, one row per arm with every seed's
    values, the reasons of each divergence; three figures."""
    results["targets"] = targets = _targets(results)
    _figures(results["arms"], out)
    columns = _heldout_columns(results)
    seeds = "; ".join(f"seed {s}" for s in results["seeds"])
    lines = report_head(results, targets)
    lines += ["", f"Per injection, each cell `{seeds}`:", "",
              "| injection | arms diverged | arms with loss spikes | rho(A) crossed 1 | "
              "max rho(A) |", "|---|---|---|---|---|"]
    lines += _injection_rows(results)
    lines += ["", f"Per arm, each cell `{seeds}`: diverged (a non-finite step, the trainer "
                  "stopped, held-out loss above the initial one, or it ended above 2x its "
                  "lowest loss), loss spikes (steps above 2x the running minimum), max rho(A) "
                  "over the steps, final loss (mean of the last tenth of the steps), held-out "
                  "loss of the final checkpoint by test-time loops T, RMS(h) after loop "
                  f"{TRAIN_LOOPS} and after the last on a held-out batch.", "",
              "| arm | diverged | spikes | max rho(A) | final loss | "
              + " | ".join(f"held-out T={t}" for t in columns)
              + f" | RMS(h) T={TRAIN_LOOPS}, last |", "|---" * (6 + len(columns)) + "|"]
    lines += [_arm_row(results, name, columns) for name in results["arms"]]
    why = [f"- {name}, seed {seed}: {'; '.join(a['diverged_because'])}"
           for seed, one in results["seeds"].items() for name, a in one["arms"].items()
           if a["diverged"]]
    lines += ["", "Why each diverged run counts as diverged:" if why else "No run diverged.",
              *([""] + why if why else [])]
    lines += ["", "![loss](trajectories.png)", "", "![rho](rho.png)", "",
              "![state by loop](state_by_loop.png)"]
    return "\n".join(lines)


def _heldout_columns(results: dict) -> list[str]:
    """The test-time loop counts of the held-out losses (of the first arm that has them)."""
    return list(next((a["heldout"] for a in results["arms"].values() if a["heldout"]), {}))


_3f = "{:.3f}".format
ARM_COLUMNS = (("diverged", lambda v: "yes" if v else "no"), ("spikes", str),
               ("max_rho", _3f), ("final_loss", _3f))


def _injection_rows(results: dict) -> list[str]:
    """Per injection: how many of its arms diverged, spiked, crossed rho 1; its max rho."""
    rows = []
    for injection in dict.fromkeys(split_name(name)[0] for name in results["arms"]):
        by_seed = [arms for one in results["seeds"].values()     # seeds with such arms
                   if (arms := [a for n, a in one["arms"].items()
                                if split_name(n)[0] == injection])]
        count = lambda test: _cell([f"{sum(map(test, arms))}/{len(arms)}" for arms in by_seed],
                                   str)
        rows.append(f"| {injection} | {count(lambda a: a['diverged'])} | "
                    f"{count(lambda a: a['spikes'] > 0)} | {count(lambda a: a['rho_crossed_1'])}"
                    f" | {_cell([max(a['max_rho'] for a in arms) for arms in by_seed], _3f)} |")
    return rows


def _arm_row(results: dict, name: str, columns: list[str]) -> str:
    values = lambda pick: per_seed(results, name, pick)
    cells = [_cell(values(lambda a, k=key: a[k]), fmt) for key, fmt in ARM_COLUMNS]
    cells += [_cell(values(lambda a, t=t: (a["heldout"] or {}).get(t)), _3f) for t in columns]
    cells.append(_cell(values(lambda a: a["state_rms_by_loop"]),
                       lambda r: f"{r[TRAIN_LOOPS - 1]:.3g}, {r[-1]:.3g}"))
    return f"| {name} | " + " | ".join(cells) + " |"


def _figures(arms: dict, out: str) -> None:
    """Training loss and rho(A) by step, RMS(h) by loop: one panel per injection (first
    seed), one line per rate and clipping, in the same colour in every panel."""
    settings = list(dict.fromkeys(split_name(name)[1] for name in arms))

    def by_injection(pick) -> dict:
        panels = {split_name(name)[0]: {s: ([], []) for s in settings} for name in arms}
        for name, a in arms.items():
            injection, setting = split_name(name)
            if pick(a) is not None:
                panels[injection][setting] = pick(a)
        return panels

    steps = lambda a, key: (a["trajectory"]["step"], a["trajectory"][key])
    loss = by_injection(lambda a: steps(a, "loss"))
    plots.panels(loss, os.path.join(out, "trajectories.png"),
                 "E3 training loss by step (first seed)", "step", logy=set(loss))
    plots.panels(by_injection(lambda a: steps(a, "rho_A")), os.path.join(out, "rho.png"),
                 "E3 rho(A) = max_i A_i by step (first seed)", "step")
    by_loop = by_injection(lambda a: None if a["state_rms_by_loop"] is None else (
        list(range(1, len(a["state_rms_by_loop"]) + 1)), a["state_rms_by_loop"]))
    plots.panels(by_loop, os.path.join(out, "state_by_loop.png"),
                 "E3 RMS(h) by test-time loop, final checkpoint (first seed)", "loop",
                 logy=set(by_loop))


def _targets(results: dict) -> list[dict]:
    per = {seed: one["arms"] for seed, one in results["seeds"].items()}
    return [_free_diverges(per), _stable_where_free_diverges(per), _rho_bounded(per),
            _rho_marks_divergence(per)]


def _diverged_settings(arms: dict, injection: str) -> list[str]:
    return [split_name(n)[1] for n, a in arms.items()
            if split_name(n)[0] == injection and a["diverged"]]


def _free_diverges(per: dict) -> dict:
    found = {seed: _diverged_settings(arms, Injection.FREE) for seed, arms in per.items()}
    return {"claim": "the unstable baseline (free: unconstrained A, B) diverges somewhere in "
                     "the grid",
            "ours": "; ".join(f"seed {s}: {', '.join(v) or 'nowhere'}" for s, v in found.items()),
            "met": any(found.values())}


def _stable_where_free_diverges(per: dict) -> dict:
    parts, clashes, tested = [], 0, 0
    for seed, arms in per.items():
        settings = _diverged_settings(arms, Injection.FREE)
        failing = [f"{form}@{setting}" for setting in settings for form in STABLE
                   if arms.get(f"{form}@{setting}", {}).get("diverged")]
        tested, clashes = tested + len(settings), clashes + len(failing)
        parts.append(f"seed {seed}: {', '.join(failing) or 'none'} diverged")
    return {"claim": "LTI and Parcae never diverge at a rate and clipping where free diverges "
                     "(Parcae: 5/5 vs 1/5-2/5)",
            "ours": "; ".join(parts) + f" (free diverged in {tested} arm(s) x seed(s))",
            "met": tested > 0 and clashes == 0}


def _rho_bounded(per: dict) -> dict:
    peaks = {seed: max((a["max_rho"] for n, a in arms.items() if split_name(n)[0] in STABLE),
                       default=None) for seed, arms in per.items()}
    shown = [p for p in peaks.values() if p is not None]
    return {"claim": "rho(A) < 1 at every step (LTI, Parcae)",
            "ours": "; ".join(f"seed {s}: max {p:.4f}" for s, p in peaks.items()
                              if p is not None) or "n/a",
            "met": bool(shown) and max(shown) < 1.0}


def _rho_marks_divergence(per: dict) -> dict:
    runs = [a for arms in per.values() for a in arms.values()]
    diverged = [a["rho_crossed_1"] for a in runs if a["diverged"]]
    converged = [a["rho_crossed_1"] for a in runs if not a["diverged"]]
    return {"claim": "divergent runs learn rho(A) > 1, convergent runs keep rho(A) <= 1 "
                     "(Parcae)",
            "ours": f"rho crossed 1 in {sum(diverged)}/{len(diverged)} diverged and "
                    f"{sum(converged)}/{len(converged)} converged runs (all arms, seeds)",
            "met": bool(diverged) and all(diverged) and not any(converged)}


EXPERIMENT = Experiment(
    name="stability",
    claim="An unconstrained injection (free A, B) diverges at high learning rates or without "
          "clipping where the stable injections (LTI, Parcae) train; rho(A) stays below 1 "
          "for them and crosses 1 where training diverges",
    base="tiny", base_overrides=BASE, quick_overrides=QUICK, arms=ARMS,
    pod=PodPreset(pod.BASE, (*pod.TRAINING, *pod.LM_DATA, *pod.MOE_MYTHOS_1B,
                             f"steps={POD_STEPS}", "optim.warmup_steps=500", *RECIPE),
                  arms(POD_LR), pod.TOPOLOGY, pod.MESH),
    evaluate=evaluate, report=report, quick_arms=("free@x30", "free@x30_noclip"),
    seeds=SEEDS)
