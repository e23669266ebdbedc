"""E4, looped vs standard (the seed's headline; Parcae's "87.5% of the gap"): byte-level LM.

Every arm is built from one block shape (dim 96, MLA, a SwiGLU FFN of width 128: the recurrent
block's MoE is one routed expert of that width and no shared expert, so its FFN equals a
prelude block's), trained on the stdlib sources at byte level for the same steps, tokens and
optimiser. ``standard_L`` is a transformer of L unique layers (L - 2 prelude layers, the block
at one loop, one coda layer); ``looped_lti`` and ``looped_parcae`` are one prelude layer, the
shared block looped and one coda layer (3 unique layers: iso-parameter with ``standard_3``),
trained with Parcae's recipe: per-sequence Poisson depth of mean ``MEAN_LOOPS`` = 4, backprop
through the last ceil(mu / 2) = 2 loops, ACT off; at mu = 4 their forward FLOPs per token are
those of ``standard_6`` (2 + 4 block applications: iso-FLOP with the transformer of twice their
parameters). ``looped_lti`` keeps OpenMythos's injection, ``looped_parcae`` uses Parcae's (with
its prelude norm and read-out).

Reported per arm: parameters, forward FLOPs per token (at the mean training loops) and training
FLOPs per token (truncated backprop counted), held-out loss (token-weighted, nats/byte) per seed
and, for the looped arms, per test-time loop count; the effective depth of each looped arm (the
unique-layer count whose transformer loss it matches, interpolated in log L between measured
arms) and the gap closed, (L_standard_3 - L_looped) / (L_standard_3 - L_standard_6), at the
training depth mu.
"""

from __future__ import annotations

import math
import os

import numpy as np

from mythos_jax.experiments import plots, pod
from mythos_jax.experiments.harness import (Arm, ArmRun, Experiment, PodPreset, loss_curve,
                                            mean_training_loops, parameter_count, report_head)
from mythos_jax.experiments.seeds import seed_values, spread
from mythos_jax.flop_count import flops_at_mean_loops
from mythos_jax.train.config import TrainConfig

UNIQUE_LAYERS = (2, 3, 4, 6, 8)
MEAN_LOOPS = 4
BACKPROP_DEPTH = math.ceil(MEAN_LOOPS / 2)
TEST_LOOPS = (1, 2, 3, 4, 6, 8, 12, 16)
ISO_LAYERS, TWICE_LAYERS = 3, 6           # iso-parameter and 2x-parameter transformers
ISO_PARAM, TWICE_PARAMS = f"standard_{ISO_LAYERS}", f"standard_{TWICE_LAYERS}"
SEEDS = (0, 1, 2)
SEQ_LEN = 128

RECIPE = ("model.act=off", "model.coda_layers=1", "log.progress=false",
          "log.tensorboard=false", "eval.every=0")
BASE = (
    "steps=600", "model.variant=tiny_mla", "model.dim=96", "model.n_heads=4",
    f"model.max_seq_len={SEQ_LEN}", "model.kv_lora_rank=32", "model.q_lora_rank=48",
    "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=24",
    "model.n_experts=1", "model.n_experts_per_tok=1", "model.n_shared_experts=0",
    "model.expert_dim=128", "data.source=stdlib", f"data.seq_len={SEQ_LEN}",
    "data.batch_size=16", "optim.lr=3e-3", "optim.warmup_steps=50", "checkpoint.every=300",
    "log.every=50", "eval.batches=8", *RECIPE,
)
QUICK = ("steps=4", "optim.warmup_steps=1", "log.every=2", "checkpoint.every=2",
         "data.seq_len=32", "eval.batches=1", "data.eval_examples=16")

ONE_LOOP = ("loops.schedule=fixed", "loops.n=1", "loops.max_loops=1", "eval.loops=[1]")
LOOPED = ("model.prelude_layers=1", "loops.schedule=poisson", f"loops.mean={MEAN_LOOPS}",
          "loops.per_sequence=true", "loops.max_loops=16",
          f"loops.backprop_depth={BACKPROP_DEPTH}", f"eval.loops={list(TEST_LOOPS)}")
PARCAE = ("model.injection=parcae", "model.prelude_norm=true", "model.readout=true")
ARMS = (
    *(Arm(f"standard_{n}", (*ONE_LOOP, f"model.prelude_layers={n - 2}"),
          f"a transformer of {n} unique layers") for n in UNIQUE_LAYERS),
    Arm("looped_lti", LOOPED, f"prelude + shared block x Poisson({MEAN_LOOPS}) + coda, "
                              "OpenMythos injection"),
    Arm("looped_parcae", (*LOOPED, *PARCAE),
        f"prelude + shared block x Poisson({MEAN_LOOPS}) + coda, Parcae injection"),
    *(Arm(f"standard_{n}_parcae", (*ONE_LOOP, f"model.prelude_layers={n - 2}", *PARCAE),
          f"a transformer of {n} unique layers whose middle block has looped_parcae's "
          "injection, prelude norm and read-out") for n in (3, 6)),
)


def unique_layers(arm: Arm) -> int | None:
    """The unique-layer count of a standard arm (None for a looped one)."""
    return int(arm.name.split("_")[1]) if arm.name.startswith("standard_") else None


def family(arm: dict) -> str:
    """An arm result's loop-block configuration (injection, prelude norm, read-out): looped
    arms are compared with the transformers of their own family."""
    model = TrainConfig.from_dict(arm["config"]).model_config()
    return f"{model.injection}, prelude_norm={model.prelude_norm}, readout={model.readout}"


def evaluate(run: ArmRun) -> dict:
    """Held-out loss by test loops, size (parameters, forward and training FLOPs per token at
    the mean training loops)."""
    model_cfg = run.cfg.model_config()
    mu = mean_training_loops(run)
    size = flops_at_mean_loops(model_cfg, run.cfg.data.seq_len, mu,
                               run.cfg.loops.build().backprop_depth)
    return {"unique_layers": unique_layers(run.arm),
            "distinct_layers": model_cfg.prelude_layers + 1 + model_cfg.coda_layers,
            "mean_loops": mu if unique_layers(run.arm) is None else None,
            "params": parameter_count(run.state.params),
            "flops_per_token": size["forward"], "train_flops_per_token": size["train"],
            "heldout_loss": loss_curve(run.train_report, "heldout")}


# ---------------------------------------------------------------------------- analysis
def training_depth_loss(arm: dict) -> float:
    """The loss at the arm's training depth: its one loop (standard) or the test loop count
    nearest its mean training loops (looped)."""
    curve = arm["heldout_loss"]
    if arm["mean_loops"] is None:
        return curve["1"]
    return curve[min(curve, key=lambda t: abs(int(t) - arm["mean_loops"]))]


def effective_depth(loss: float, standard: dict[int, float]) -> float:
    """The unique-layer count whose transformer loss equals ``loss``, interpolated linearly in
    log(layers) between the two measured transformers around it; +-inf beyond the range."""
    layers = sorted(standard)
    if loss <= standard[layers[-1]]:
        return math.inf if loss < standard[layers[-1]] else float(layers[-1])
    if loss > standard[layers[0]]:
        return -math.inf
    for small, big in zip(layers, layers[1:]):
        hi, lo = standard[small], standard[big]
        if lo <= loss <= hi:
            share = (hi - loss) / (hi - lo) if hi > lo else 0.0
            return float(math.exp(math.log(small) + share * (math.log(big) - math.log(small))))
    return math.nan     # the transformer curve is not monotone around ``loss``


def gap_closed(looped: float, iso_param: float, twice_params: float) -> float:
    """(L_iso_param - L_looped) / (L_iso_param - L_2x_params)."""
    return (iso_param - looped) / (iso_param - twice_params)


def _per_seed(results: dict) -> dict[str, dict]:
    """Per seed: each looped arm's loss, and against the transformers of its family (same
    loop-block configuration at one loop) its effective depth and gap closed."""
    out = {}
    for seed, one in results["seeds"].items():
        arms = one["arms"]
        standards: dict[str, dict[int, float]] = {}
        for a in arms.values():
            if a["unique_layers"] is not None:
                standards.setdefault(family(a), {})[a["unique_layers"]] = training_depth_loss(a)
        looped = {}
        for name, a in arms.items():
            standard = standards.get(family(a), {})
            if a["unique_layers"] is not None or not standard:
                continue
            loss = training_depth_loss(a)
            looped[name] = {"loss": loss, "effective_depth": effective_depth(loss, standard),
                            "compared_with": sorted(standard)}
            if ISO_LAYERS in standard and TWICE_LAYERS in standard:
                looped[name]["gap"] = standard[ISO_LAYERS] - standard[TWICE_LAYERS]
                looped[name]["gap_closed"] = gap_closed(loss, standard[ISO_LAYERS],
                                                        standard[TWICE_LAYERS])
        out[seed] = {"looped": looped}
    return out


# ---------------------------------------------------------------------------- report
def report(results: dict, out: str) -> str:
    """Targets, the per-arm table (size, loss per seed), the looped arms' depth curves, the
    plots; ``results["arms"]`` becomes the issue's layout (losses per seed per test loops)."""
    names = list(results["arms"])
    first = results["arms"]
    per_seed = _per_seed(results)
    results["arms"] = {name: {key: first[name][key] for key in
                              ("unique_layers", "distinct_layers", "mean_loops", "params",
                               "flops_per_token", "train_flops_per_token")}
                       | {"loss": {seed: one["arms"][name]["heldout_loss"]
                                   for seed, one in results["seeds"].items()
                                   if name in one["arms"]}}
                       for name in names}
    looped_names = [n for n in names if results["arms"][n]["unique_layers"] is None]
    results["gap_closed_per_seed"] = {n: gaps for n in looped_names
                                      if (gaps := _looped_values(per_seed, n, "gap_closed"))}
    results["gap_closed"] = {n: float(np.mean(g)) for n, g in
                             results["gap_closed_per_seed"].items()}   # read with the above
    results["effective_depth"] = {n: _looped_values(per_seed, n, "effective_depth")
                                  for n in looped_names}
    results["targets"] = targets = _targets(per_seed, looped_names)
    _plot(results, out)
    lines = report_head(results, targets)
    lines += ["", "| arm | distinct layers | mean loops | parameters | forward FLOPs / token | "
                  "training FLOPs / token | held-out loss at its training depth |",
              "|---|---|---|---|---|---|---|"]
    for name in names:
        a = results["arms"][name]
        losses = seed_values(results, name, training_depth_loss)
        lines.append(f"| {name} | {a['distinct_layers']} | "
                     f"{'1' if a['mean_loops'] is None else format(a['mean_loops'], '.2f')} | "
                     f"{a['params']:,} | {a['flops_per_token'] / 1e6:.2f} M | "
                     f"{a['train_flops_per_token'] / 1e6:.2f} M | {spread(losses, '.4f')} |")
    for name in looped_names:
        columns = list(results["arms"][name]["loss"][next(iter(results["seeds"]))])
        lines += ["", f"**{name}**: held-out loss by test-time loops (mean (min-max) over "
                      "seeds)", "", "| test loops | " + " | ".join(columns) + " |",
                  "|---" * (len(columns) + 1) + "|",
                  "| loss | " + " | ".join(
                      spread([s[c] for s in results["arms"][name]["loss"].values()], ".4f")
                      for c in columns) + " |"]
    lines += ["", "![loss against parameters and FLOPs](loss_vs_size.png)"]
    return "\n".join(lines)


def _looped_values(per_seed: dict, name: str, key: str) -> list:
    """``key`` of looped arm ``name`` at every seed that has it."""
    return [s["looped"][name][key] for s in per_seed.values()
            if key in s["looped"].get(name, {})]


def _layers_text(depth: float, layers: list[int]) -> str:
    """An effective depth as text: "< 3" / "> 8" outside the measured transformers."""
    if depth == -math.inf:
        return f"< {layers[0]} layers"
    if depth == math.inf:
        return f"> {layers[-1]} layers"
    return f"{depth:.2f} layers"


def _targets(per_seed: dict, looped_names: list[str]) -> list[dict]:
    found = []
    for name in looped_names:
        gaps = _looped_values(per_seed, name, "gap_closed")
        if gaps:
            widths = _looped_values(per_seed, name, "gap")
            shown = ", ".join(f"{g:.0%} of {w:+.4f}" for g, w in zip(gaps, widths))
            found.append({"claim": f"{name}: closes >= 87.5% of the gap between the "
                                   f"{ISO_LAYERS}-layer transformer (iso-parameter) and the "
                                   f"{TWICE_LAYERS}-layer one (2x parameters, iso-FLOP) of its "
                                   "block family (Parcae)",
                          "ours": f"per seed: {shown} nats (met: >= 87.5% at every seed, of a "
                                  "positive gap)",
                          "met": bool(min(gaps) >= 0.875 and min(widths) > 0)})
        depths = _looped_values(per_seed, name, "effective_depth")
        if depths:
            layers = _looped_values(per_seed, name, "compared_with")[0]
            shown = ", ".join(_layers_text(d, layers) for d in depths)
            found.append({"claim": f"{name}: an effective depth >= {TWICE_LAYERS} unique layers "
                                   "(the transformer of its forward FLOPs)",
                          "ours": f"per seed: {shown} (against its family's transformers of "
                                  f"{layers} layers)",
                          "met": bool(min(depths) >= TWICE_LAYERS)})
    return found


def _plot(results: dict, out: str) -> None:
    """Held-out loss (seed mean) against parameters and against forward FLOPs, every arm."""
    arms = results["arms"]
    losses = {name: float(np.mean(seed_values(results, name, training_depth_loss)))
              for name in arms}
    series = {}
    for axis, key in (("parameters", "params"), ("forward FLOPs / token", "flops_per_token")):
        series[axis] = {name: ([arms[name][key]], [losses[name]]) for name in arms}
    plots.scatter_panels(series, os.path.join(out, "loss_vs_size.png"),
                         "E4 held-out loss (nats/byte, mean over seeds) against size",
                         "held-out loss")


EXPERIMENT = Experiment(
    name="looped_vs_standard",
    claim="A looped model (prelude + one shared block + coda) reaches most of the quality of a "
          "standard transformer of twice its parameters at equal FLOPs (Parcae)",
    base="tiny", base_overrides=BASE, quick_overrides=QUICK, arms=ARMS,
    pod=PodPreset(pod.BASE, (*pod.TRAINING, *pod.LM_DATA, *pod.DENSE_MYTHOS_1B, "steps=20000",
                             *RECIPE), ARMS, pod.TOPOLOGY, pod.MESH),
    evaluate=evaluate, report=report, quick_arms=(ISO_PARAM, TWICE_PARAMS, "looped_lti"),
    seeds=SEEDS)
