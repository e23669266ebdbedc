"""E5, inside the loop: the full OpenMythos block looped with random depth; dense vs MoE
(matched active, then matched total parameters), MLA vs GQA, and the MoE's routing at every
loop iteration.

The model is E2's ``cpu_small`` (dim 96, one prelude and one coda layer, ACT off, OpenMythos's
LTI injection) on the stdlib sources at byte level: 800 steps of 16 x 128 bytes, Poisson(4)
loops (at most 16, backprop through the last 4: E2's ``random_depth`` recipe), with a
200-step warmup where E2 has 50 (with 50, ``dense_total`` failed to leave its start at seed
2). The arms differ in the looped block only (a "dense" block is a MoE of one expert at
top-1, whose router softmax is 1, beside the shared expert):

  moe_mla       8 routed experts of width 64, top-2, + 1 shared expert of width 128 (the
                preset): 256 of the 640 FFN channels run per token
  moe_gqa       moe_mla with GQA attention (4 heads, 2 KV heads: as many parameters)
  dense_active  an FFN of width 256 (128 + the shared 128): moe_mla's active parameters
  dense_total   an FFN of width 640 (320 + the shared 320): moe_mla's total parameters
  moe_fast_bias moe_mla with the aux-loss-free bias balancing 10x faster
                (``router_bias_rate=0.01``)
  moe_aux       moe_mla plus the balance loss (``aux_loss_weight=0.01``), averaged over
                (sequence, iteration) pairs: it balances every depth, where the bias is
                updated from the load summed over a step's iterations

The last two are the fixes tried for the routing collapse that the project's default
(``router_bias_rate=1e-3``) shows in short runs (experiments/README.md, E5).

Evaluated per arm and seed: held-out loss at test loops 1 .. 16; parameters counted from the
trained state and the active ones (routed experts at K / E); forward FLOPs per token at 4
loops; for the MoE arms the routing on held-out bytes at every iteration of a 16-loop forward
(``routing.routing_by_loop``: load per expert, its max / mean and effective number of experts,
the share of tokens whose top-K changed since the previous iteration, the router z-loss), the
final router bias and, from training, the z-loss and the load max / mean of the last quarter
of the logged steps.
"""

from __future__ import annotations

import math
import os

import jax.numpy as jnp
import numpy as np

from mythos_jax.config import MythosConfig
from mythos_jax.experiments import plots, pod
from mythos_jax.experiments.harness import (Arm, ArmRun, Experiment, PodPreset, loss_curve,
                                            mean_training_loops, parameter_count, report_head)
from mythos_jax.experiments.routing import routing_by_loop
from mythos_jax.experiments.seeds import mean_matrix, seed_values, spread, spread_matrix
from mythos_jax.flop_count import forward_flops_per_token
from mythos_jax.train import data as data_lib
from mythos_jax.train.config import load_train_config
from mythos_jax.train.step import model_from_state
from mythos_jax.variants import get_variant

TRAIN_LOOPS = 4
TEST_LOOPS = (1, 2, 3, 4, 6, 8, 12, 16)
ROUTING_LOOPS = {False: 16, True: 4}          # iterations traced, full run / --quick
BALANCED = 1.5                                 # max / mean load that still counts as balanced
SEEDS = (0, 1, 2)                              # ~49 min on idle cores (README)
MLA_MOE = ("moe_mla", "moe_fast_bias", "moe_aux")   # the MoE arms compared with dense ones
ROUTED_KERNELS = ("gate", "up", "down")        # the MoE's stacked (E, ...) expert kernels
ROUTING_ROWS = {"max_over_mean": ("load max / mean", ".2f"),      # routing key: (label, format)
                "effective_experts": ("effective experts", ".1f"),
                "topk_changed": ("top-K changed", ".0%"), "z_loss": ("router z-loss", ".2f")}

RECIPE = ("log.progress=false", "log.tensorboard=false", "eval.every=0",
          f"eval.loops={list(TEST_LOOPS)}", "model.act=off",
          "loops.schedule=poisson", f"loops.mean={TRAIN_LOOPS}", "loops.max_loops=16",
          f"loops.backprop_depth={TRAIN_LOOPS}")
BASE = ("steps=800", "optim.warmup_steps=200", "checkpoint.every=400", "log.every=25",
        "eval.batches=4", *RECIPE)
QUICK = ("steps=6", "optim.warmup_steps=2", "log.every=3", "checkpoint.every=3",
         "data.seq_len=32", "eval.batches=1", "eval.loops=[1,2,4]", "data.eval_examples=16")


def dense(width: int, shared: int) -> tuple[str, ...]:
    """A dense looped FFN of ``width`` channels: one routed expert at top-1 and ``shared``
    shared experts (as wide: ``expert_dim * n_experts_per_tok``), ``width / (1 + shared)``
    each."""
    return ("model.n_experts=1", "model.n_experts_per_tok=1",
            f"model.expert_dim={width // (1 + shared)}")


def arms(moe: MythosConfig) -> tuple[Arm, ...]:
    """The arms around ``moe``, the MoE arms' model: its dense twins have the FFN width of its
    active experts per token (routed top-K + shared) and of all its experts."""
    k, f, shared = moe.n_experts_per_tok, moe.expert_dim, moe.n_shared_experts
    active, total = (k + shared * k) * f, (moe.n_experts + shared * k) * f
    return (
        Arm("moe_mla", (), f"{moe.n_experts} experts of {f}, top-{k}, + {shared} shared of "
                           f"{moe.shared_hidden}; MLA"),
        Arm("moe_gqa", ("model.attn_type=gqa",), "moe_mla with GQA attention"),
        Arm("dense_active", dense(active, shared),
            f"dense FFN of {active}: moe_mla's active parameters"),
        Arm("dense_total", dense(total, shared),
            f"dense FFN of {total}: moe_mla's total parameters"),
        Arm("moe_fast_bias", ("optim.router_bias_rate=0.01",), "moe_mla, bias rate 0.01 (10x)"),
        Arm("moe_aux", ("optim.aux_loss_weight=0.01",),
            "moe_mla + balance loss 0.01 (per sequence and iteration)"),
    )


ARMS = arms(load_train_config("cpu_small").model_config())


def parameter_counts(params, cfg: MythosConfig) -> dict[str, int]:
    """Parameters of a model's param tree (arrays or shape structs) and the active ones per
    token: the routed experts' kernels count K / E (router, shared expert and the rest: 1)."""
    total = parameter_count(params)
    ffn = params["recurrent"]["block"]["ffn"]
    routed = sum(math.prod(ffn[name].shape) for name in ROUTED_KERNELS)
    idle = routed // cfg.n_experts * (cfg.n_experts - cfg.n_experts_per_tok)
    return {"params": total, "active_params": total - idle}


def evaluate(run: ArmRun) -> dict:
    """Held-out loss by test loops, the arm's size, and for a MoE its routing by loop."""
    cfg = run.cfg.model_config()
    result = {"train_mean_loops": mean_training_loops(run),
              "loss": loss_curve(run.train_report, "heldout"),
              **parameter_counts(run.state.params, cfg),
              "flops_per_token": forward_flops_per_token(cfg, run.cfg.data.seq_len,
                                                         TRAIN_LOOPS)["total"]}
    if cfg.n_experts > 1:
        result["routing"] = held_out_routing(run, ROUTING_LOOPS[run.quick])
        result["router_bias"] = np.asarray(
            run.state.buffers["recurrent"]["block"]["ffn"]["router_bias"]).tolist()
        result["train_routing"] = training_routing(run.metrics)
    return result


def held_out_routing(run: ArmRun, n_loops: int) -> dict[str, dict]:
    """``routing_by_loop`` on the held-out rows of the first ``eval.batches`` batches
    (padding rows left out)."""
    batches = data_lib.eval_batches(run.cfg.data, "heldout")[:run.cfg.eval.batches]
    rows = np.concatenate([b["inputs"][b["loss_mask"].any(axis=1)] for b in batches])
    model = model_from_state(run.plan, run.state)
    model.eval()
    with run.plan.context():
        return routing_by_loop(model, jnp.asarray(rows), n_loops)


def training_routing(metrics: list[dict]) -> dict[str, float]:
    """The router z-loss, load max / mean (the load summed over a step's iterations: what the
    bias balances) and balance loss, averaged over the last quarter of the logged steps."""
    logged = [m for m in metrics if "z_loss" in m]
    last = logged[-max(1, len(logged) // 4):]
    return {key: float(np.mean([m[key] for m in last]))
            for key in ("z_loss", "load_max_over_mean", "aux_loss")}


# ---------------------------------------------------------------------------- report
def best_loss(arm: dict) -> float:
    """The lowest held-out loss over the test loop counts."""
    return min(arm["loss"].values())


def worst_balance(routing: dict[str, dict], up_to: int) -> float:
    """The largest load max / mean over iterations 1 .. ``up_to``."""
    return max(v["max_over_mean"] for t, v in routing.items() if int(t) <= up_to)


def report(results: dict, out: str) -> str:
    """Targets, arm sizes, loss by test loops and routing by loop (mean (min-max) over
    seeds); writes loss_by_loops.png, and for MoE arms routing_heatmap.png and
    routing_by_loops.png."""
    names = list(results["arms"])
    moe = [n for n in names if "routing" in results["arms"][n]]
    results["targets"] = targets = _targets(results, names, moe)
    n_seeds = len(results["seeds"])
    losses = [{n: one["arms"][n]["loss"] for n in names} for one in results["seeds"].values()]
    plots.curves({n: ([int(t) for t in c], list(c.values()))
                  for n, c in mean_matrix(losses).items()},
                 os.path.join(out, "loss_by_loops.png"),
                 f"E5 held-out loss (nats/byte) by test-time loops, mean of {n_seeds} seed(s)",
                 "test-time loops", "held-out loss", logx=True)
    lines = report_head(results, targets)
    lines += ["", "| arm | FFN in the loop | parameters | active parameters | forward FLOPs / "
                  f"token at {TRAIN_LOOPS} loops | mean training loops |", "|---" * 6 + "|"]
    for name in names:
        arm = results["arms"][name]
        description = next(a.description for a in ARMS if a.name == name)
        lines.append(f"| {name} | {description} | {arm['params']:,} | {arm['active_params']:,} "
                     f"| {arm['flops_per_token'] / 1e6:.3f} M | {arm['train_mean_loops']:.2f} |")
    lines += ["", f"Held-out loss (nats/byte) by test-time loops, mean over {n_seeds} seed(s)"
                  + (" (min-max)" if n_seeds > 1 else "") + ":", ""]
    lines += spread_matrix(losses, "arm", ".4f")
    if moe:
        lines += _routing_section(results, moe, out)
    lines += ["", "![loss by loops](loss_by_loops.png)"]
    return "\n".join(lines)


def _routing_section(results: dict, moe: list[str], out: str) -> list[str]:
    """Per MoE arm: routing by loop and the balance summary; the two routing plots."""
    first = results["arms"]
    n_loops = len(first[moe[0]]["routing"])
    plots.heatmaps({n: np.transpose([v["load"] for v in first[n]["routing"].values()])
                    for n in moe}, os.path.join(out, "routing_heatmap.png"),
                   f"E5 share of held-out (token, slot) assignments per expert and loop "
                   f"(seed {results['seed']}; uniform = 1/E)", "loop iteration", "expert",
                   [str(t) for t in range(1, n_loops + 1)], "share")
    plots.panels({label: {n: _mean_by_loop(results, n, key) for n in moe}
                  for key, (label, _) in ROUTING_ROWS.items()},
                 os.path.join(out, "routing_by_loops.png"),
                 "E5 routing by loop iteration on held-out bytes (mean over seeds)",
                 "loop iteration")
    columns = [str(t) for t in TEST_LOOPS if t <= n_loops]
    lines = ["", f"Routing on held-out bytes at each iteration of a {n_loops}-loop forward "
                 "(columns: iteration; mean (min-max) over seeds). Load max / mean is 1 when "
                 "balanced and E / K once one expert is in every token's top-K; effective "
                 "experts (exp of the load's entropy) E when balanced, K when every token "
                 "picks the same K; top-K changed: the share of tokens whose set of experts "
                 "differs from the previous iteration's."]
    for name in moe:
        runs = seed_values(results, name, lambda a: a["routing"])
        lines += ["", f"**{name}**", "", "| quantity \\ loop | " + " | ".join(columns) + " |",
                  "|---" * (len(columns) + 1) + "|"]
        for key, (label, fmt) in ROUTING_ROWS.items():
            cells = ["-" if runs[0][t][key] is None else spread([r[t][key] for r in runs], fmt)
                     for t in columns]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Balance: the bias sees the load summed over a step's iterations (training "
                  "column, last quarter of the steps); held out, per iteration:", "",
              f"| arm | train load max / mean | worst loop 1..{2 * TRAIN_LOOPS} | worst loop "
              f"> {2 * TRAIN_LOOPS} | train z-loss | router bias max - min |",
              "|---" * 6 + "|"]
    lines += [_balance_row(results, name, n_loops > 2 * TRAIN_LOOPS) for name in moe]
    return lines + ["", "![routing heatmap](routing_heatmap.png)", "",
                    "![routing by loops](routing_by_loops.png)"]


def _balance_row(results: dict, arm: str, deep: bool) -> str:
    """One MoE arm's balance summary over seeds (see ``_routing_section``); ``deep``: the
    routing goes beyond 2 mu loops."""
    def cell(pick, fmt=".2f"):
        return spread(seed_values(results, arm, pick), fmt)

    beyond = cell(lambda a: max(v["max_over_mean"] for t, v in a["routing"].items()
                                if int(t) > 2 * TRAIN_LOOPS)) if deep else "-"
    return (f"| {arm} | {cell(lambda a: a['train_routing']['load_max_over_mean'])} "
            f"| {cell(lambda a: worst_balance(a['routing'], 2 * TRAIN_LOOPS))} | {beyond} "
            f"| {cell(lambda a: a['train_routing']['z_loss'])} "
            f"| {cell(lambda a: np.ptp(a['router_bias']), '.3f')} |")


def _mean_by_loop(results: dict, arm: str, key: str) -> tuple[list[int], list[float]]:
    """(iterations, mean over seeds of routing ``key``), iterations where it is defined."""
    runs = seed_values(results, arm, lambda a: a["routing"])
    loops = [t for t, v in runs[0].items() if v[key] is not None]
    return [int(t) for t in loops], [float(np.mean([r[t][key] for r in runs])) for t in loops]


def _targets(results: dict, names: list[str], moe: list[str]) -> list[dict]:
    comparisons = [  # (arm, rival, bound on the per-seed arm / rival - 1, claim)
        *((arm, "dense_active", 0.0, "MoE beats the dense block of as many active parameters")
          for arm in MLA_MOE),
        *((arm, "dense_total", 0.01, "MoE within 1% of the dense block of as many total "
                                     "parameters (2.5x its FFN FLOPs)") for arm in MLA_MOE),
        ("moe_mla", "moe_gqa", 0.01, "MLA within 1% of GQA (or better)")]
    found = []
    for arm, rival, bound, claim in comparisons:
        if arm in names and rival in names:
            gaps = [a / r - 1 for a, r in zip(seed_values(results, arm, best_loss),
                                              seed_values(results, rival, best_loss))]
            found.append({"claim": f"{claim}: best held-out loss, {arm} vs {rival}",
                          "ours": f"{spread(gaps, '+.2%')} (per seed: {arm} / {rival} - 1)",
                          "met": max(gaps) <= bound})
    for name in moe:
        worst = seed_values(results, name,
                            lambda a: worst_balance(a["routing"], 2 * TRAIN_LOOPS))
        found.append({"claim": f"{name}: every depth 1..{2 * TRAIN_LOOPS} balanced on held-out "
                               f"bytes (load max / mean <= {BALANCED}; collapse: E / K)",
                      "ours": f"worst loop {spread(worst, '.2f')}", "met": max(worst) <= BALANCED})
    return found


EXPERIMENT = Experiment(
    name="inside_the_loop",
    claim="Inside the loop a MoE block beats a dense block of as many active parameters and "
          "nears one of as many total parameters, MLA matches GQA, and the bias balancing "
          "keeps the routing balanced at every loop depth",
    base="cpu_small", base_overrides=BASE, quick_overrides=QUICK, arms=ARMS,
    pod=PodPreset(pod.BASE, (*pod.TRAINING, *pod.LM_DATA, *pod.MOE_MYTHOS_1B, "steps=20000",
                             *RECIPE), arms(get_variant("mythos_1b")), pod.TOPOLOGY, pod.MESH),
    evaluate=evaluate, report=report, quick_arms=("moe_mla",), seeds=SEEDS)
