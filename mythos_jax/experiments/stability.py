"""E3, stability: a learning-rate sweep of the injection forms (Parcae's LR table in miniature).

Arms ``<injection>@x<m>``: the E2 recipe (byte-level stdlib LM, random depth Poisson(4) with
backprop through the last 4, ACT off) on the small ``tiny_mla`` model, learning rate m times
E2's 3e-3 for m in 1, 3, 10, 30, with injection "openmythos" (LTI: ``A h + B e + u``),
"parcae" and "additive" (``h + e + u``: no decay, the unstable baseline). Recorded per arm:
whether it diverged (a non-finite step, or a final loss above the initial one), the final
loss, and the trajectories of rho(A) (the largest decay) and ||h|| (RMS of the final hidden
state) over training.
"""

from __future__ import annotations

import math
import os

from mythos_jax.experiments import plots
from mythos_jax.experiments.harness import Arm, ArmRun, Experiment, report_head
from mythos_jax.modes import Injection

BASE_LR = 3e-3
MULTIPLIERS = (1, 3, 10, 30)

BASE = ("steps=300", "model.variant=tiny_mla", "model.act=off", "data.source=stdlib",
        "data.seq_len=64", "data.batch_size=16", "loops.schedule=poisson", "loops.mean=4",
        "loops.max_loops=16", "loops.backprop_depth=4", "optim.warmup_steps=30",
        "optim.max_nonfinite=20", "checkpoint.every=300", "log.every=1", "log.progress=false",
        "log.tensorboard=false", "eval.batches=2", "eval.loops=[4]")
QUICK = ("steps=4", "optim.warmup_steps=1", "checkpoint.every=2", "data.seq_len=32",
         "eval.batches=1", "data.eval_examples=16")


def _arm(injection: str, multiplier: int) -> Arm:
    parcae = injection == Injection.PARCAE
    extra = ("model.prelude_norm=true", "model.readout=true") if parcae else ()
    return Arm(f"{injection}@x{multiplier}",
               (f"model.injection={injection}", f"optim.lr={BASE_LR * multiplier:g}", *extra),
               f"injection {injection}, lr {BASE_LR * multiplier:g}")


ARMS = tuple(_arm(injection, m) for injection in Injection.names() for m in MULTIPLIERS)


def evaluate(run: ArmRun) -> dict:
    """Divergence, final loss and the rho(A) / ||h|| trajectories from metrics.jsonl."""
    steps = [m for m in run.metrics if "loss" in m]
    losses = [m["loss"] for m in steps]
    nonfinite = sum(1 for m in steps if not m["finite"])
    finite_losses = [x for x in losses if math.isfinite(x)]
    final = finite_losses[-1] if finite_losses else float("nan")
    diverged = (run.diverged is not None or nonfinite > 0 or not finite_losses
                or final > losses[0])
    return {"diverged": bool(diverged), "nonfinite_steps": nonfinite,
            "initial_loss": losses[0], "final_loss": final,
            "max_rho": max(m["rho_A"] for m in steps),
            "trajectory": {"step": [m["step"] for m in steps], "loss": losses,
                           "rho_A": [m["rho_A"] for m in steps],
                           "state_rms": [m["state_rms"] for m in steps]},
            "stopped": run.diverged}


def report(results: dict, out: str) -> str:
    arms = results["arms"]
    results["targets"] = targets = _targets(arms)
    series = {quantity: {name: (a["trajectory"]["step"], a["trajectory"][quantity])
                         for name, a in arms.items()}
              for quantity in ("loss", "rho_A", "state_rms")}
    plots.panels(series, os.path.join(out, "trajectories.png"),
                 "E3 training loss, rho(A) and RMS of h by step", "step",
                 logy={"state_rms"})
    lines = report_head(results, targets)
    lines += ["", "| arm | diverged | non-finite steps | initial loss | final loss | max rho(A) "
                  "| final RMS(h) |", "|---|---|---|---|---|---|---|"]
    for name, a in arms.items():
        lines.append(f"| {name} | {'yes' if a['diverged'] else 'no'} | {a['nonfinite_steps']} | "
                     f"{a['initial_loss']:.3f} | {a['final_loss']:.3f} | {a['max_rho']:.4f} | "
                     f"{a['trajectory']['state_rms'][-1]:.3g} |")
    lines += ["", "![trajectories](trajectories.png)"]
    return "\n".join(lines)


def _targets(arms: dict) -> list[dict]:
    by_rate: dict[str, dict[str, dict]] = {}
    for name, a in arms.items():
        injection, rate = name.split("@")
        by_rate.setdefault(rate, {})[injection] = a
    additive_fails = [r for r, forms in by_rate.items()
                      if forms.get("additive", {}).get("diverged")]
    stable_there = all(not by_rate[r][f]["diverged"] for r in additive_fails
                       for f in ("openmythos", "parcae") if f in by_rate[r])
    bounded = [a["max_rho"] for n, a in arms.items() if not n.startswith("additive")]
    return [
        {"claim": "LTI and Parcae converge at every rate where additive diverges",
         "ours": (f"additive diverged at {additive_fails}" if additive_fails
                  else "additive diverged at no rate tried") + (
             "; LTI and Parcae converged there" if additive_fails and stable_there else
             "; LTI or Parcae diverged there too" if additive_fails else ""),
         "met": bool(additive_fails) and stable_there},
        {"claim": "rho(A) < 1 at every step (LTI, Parcae)",
         "ours": f"max {max(bounded):.4f}" if bounded else "n/a",
         "met": bool(bounded) and max(bounded) < 1.0},
    ]


EXPERIMENT = Experiment(
    name="stability",
    claim="The stable injections (LTI, Parcae) train at learning rates where additive "
          "injection diverges; rho(A) stays below 1",
    base="tiny", base_overrides=BASE, quick_overrides=QUICK, arms=ARMS,
    evaluate=evaluate, report=report,
    quick_arms=("parcae@x30", "additive@x30"))
