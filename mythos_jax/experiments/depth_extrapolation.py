"""E1, depth extrapolation (Kohli et al. in miniature): k-hop composition over a knowledge graph.

Task (``data.source="khop_graph"``): 32 entities, 4 relations (random permutations fixed by
``data.khop_graph_seed=0``, the same graph and eval queries at every seed), queries
``e r1 .. rk`` answered by ``rk(..r1(e))``; training draws k in 1..K_train = 4 and scores every
relation position on the entity reached so far (``khop_supervision="every_hop"``: the hops stay
implicit, no intermediate entity is ever an input). Leak-free split: 10% of the multi-hop
tuples are held out by a hash of the tuple, and training never draws a tuple one of whose
prefixes is held out (every prefix is a scored position), so the in-distribution rows (k <= 4)
ask compositions the model was never scored on. Eval: exact match of the answer on 1 .. 3 K_train
hops at test loops 1 .. 32, and the adaptive exits "kl" (Huginn, 5e-4) and "kl_entropy" (Kohli:
KL < 1e-3 and entropy < 3 nats) with at most 32 loops, compared with the cheapest fixed budget
that is as accurate. The model is ``tiny_mla`` (one prelude and one coda layer, dim 64) with a
dense recurrent block (one expert + the shared one) and the loop-index embedding scaled to the
token embeddings' size (``loop_embed_scale=0.02``). AdamW at 3e-3 after a 500-step warmup: with
50 steps the looped arms left their initial plateau after step 2,000 at some seeds.

Arms (each at every seed of ``SEEDS``; the seed moves the init, loop draws and data order only):
``looped_random`` (Poisson depth, ACT off), ``looped_fixed`` (6 loops), ``single_loop`` (the same
model at 1 loop: iso-parameter), ``iso_depth_stack`` (6 distinct prelude layers + 1 loop + coda:
as many block applications as ``looped_fixed``, about 0.6x its FLOPs) and ``iso_flop_stack``
(``iso_flop_prelude_layers`` distinct prelude layers + 1 loop + coda: the forward FLOPs per token of
``looped_fixed``, from ``flop_count``). The looped arms' position controls are E1b
(``position_control``), which reuses this task, evaluation and report (``khop_report``).
"""

from __future__ import annotations

import functools
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mythos_jax.experiments import plots, pod
from mythos_jax.experiments.harness import (Arm, ArmRun, Experiment, PodPreset,
                                            mean_training_loops, parameter_count, report_head)
from mythos_jax.experiments.seeds import mean_matrix, seed_values, spread, spread_matrix
from mythos_jax.flop_count import flops_at_mean_loops
from mythos_jax.loops import LoopSpec
from mythos_jax.train import data as data_lib
from mythos_jax.train.config import TrainConfig, load_train_config
from mythos_jax.train.step import model_from_state

TRAIN_MAX_HOPS = 4
EVAL_HOPS = tuple(range(1, 3 * TRAIN_MAX_HOPS + 1))
TEST_LOOPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
EXIT_RULES = {"kl": 5e-4, "kl_entropy": 1e-3}
MAX_EXIT_LOOPS = 32
SEEDS = (0, 1, 2)
FIXED_LOOPS = 6
SEQ_LEN = 16

RECIPE = (
    "model.act=off", f"model.max_seq_len={SEQ_LEN}", "model.loop_embed_scale=0.02",
    "data.source=khop_graph", f"data.khop_train_max_hops={TRAIN_MAX_HOPS}",
    f"data.khop_eval_hops={list(EVAL_HOPS)}", "data.khop_supervision=every_hop",
    "data.khop_graph_seed=0", f"data.seq_len={SEQ_LEN}", "log.progress=false",
    "log.tensorboard=false", f"eval.loops={list(TEST_LOOPS)}", "eval.batches=4",
)
BASE = (
    "steps=2000", "model.variant=tiny_mla", "model.n_experts=1", "model.n_experts_per_tok=1",
    "model.expert_dim=128", "data.khop_entities=32", "data.khop_relations=4",
    "data.batch_size=64", "data.eval_examples=256", "optim.lr=3e-3", "optim.warmup_steps=500",
    "checkpoint.every=500", "log.every=25", *RECIPE,
)
# mythos_1b's attention, one dense FFN of 2 x 2816 channels (routed + shared, as tiny_mla's
# is 2 x 128), one prelude and one coda layer; the largest graph the byte-level task allows.
POD_BASE = (
    *pod.TRAINING, "steps=20000", "optim.warmup_steps=500", "model.variant=mythos_1b",
    "model.n_experts=1", "model.n_experts_per_tok=1", "model.n_shared_experts=1",
    "model.expert_dim=2816", "model.prelude_layers=1", "model.coda_layers=1",
    "data.khop_entities=128", "data.khop_relations=16", "data.batch_size=1024",
    "data.eval_examples=4096", *RECIPE,
)
QUICK = ("steps=4", "optim.warmup_steps=2", "log.every=2", "checkpoint.every=2",
         "data.khop_eval_hops=[2,5]", "eval.loops=[1,3]", "eval.batches=1",
         "data.eval_examples=64")


def forward_flops(cfg: TrainConfig, n_loops: float) -> float:
    """Forward FLOPs per token of ``cfg``'s model at ``n_loops`` (fractional counts
    interpolate: the recurrent block's FLOPs are linear in the loops)."""
    return flops_at_mean_loops(cfg.model_config(), cfg.data.seq_len, n_loops)["forward"]


@functools.cache
def iso_flop_prelude_layers(base: str, base_overrides: tuple[str, ...]) -> int:
    """The prelude depth whose 1-loop model has the forward FLOPs per token nearest to the
    looped model of ``base`` + ``base_overrides`` at ``FIXED_LOOPS`` loops."""
    def flops(overrides: tuple[str, ...], n_loops: int) -> float:
        return forward_flops(load_train_config(base, [*base_overrides, *overrides]), n_loops)

    target = flops((), FIXED_LOOPS)
    return min(range(1, 33), key=lambda n: abs(flops((f"model.prelude_layers={n}",), 1) - target))


ONE_LOOP = ("loops.schedule=fixed", "loops.n=1", "loops.max_loops=1")
FIXED_DEPTH = ("loops.schedule=fixed", f"loops.n={FIXED_LOOPS}", f"loops.max_loops={FIXED_LOOPS}")
RANDOM_DEPTH = ("loops.schedule=poisson", "loops.mean=6", "loops.max_loops=12",
                "loops.backprop_depth=6")
LOOPED_RANDOM = Arm("looped_random", RANDOM_DEPTH,
                    "random depth: Poisson(6) loops, at most 12, backprop through the last 6")
LOOPED_FIXED = Arm("looped_fixed", FIXED_DEPTH, f"{FIXED_LOOPS} loops every step")


def arms(base: str, base_overrides: tuple[str, ...]) -> tuple[Arm, ...]:
    """E1's arms on the model of ``base`` + ``base_overrides`` (it sizes the iso-FLOP stack)."""
    iso_flop = iso_flop_prelude_layers(base, base_overrides)
    return (
        LOOPED_RANDOM, LOOPED_FIXED,
        Arm("single_loop", ONE_LOOP, "the same model at 1 loop (iso-parameter)"),
        Arm("iso_depth_stack", (*ONE_LOOP, "model.prelude_layers=6"),
            "6 distinct prelude layers + 1 loop + coda: 8 block applications (iso-depth)"),
        Arm("iso_flop_stack", (*ONE_LOOP, f"model.prelude_layers={iso_flop}"),
            f"{iso_flop} distinct prelude layers + 1 loop + coda: the forward FLOPs of "
            f"{FIXED_LOOPS} loops (iso-FLOP)"),
    )


CPU_BASE = "tiny"
ARMS = arms(CPU_BASE, BASE)
LOOPED_ARMS = ("looped_random", "looped_fixed")
STACKS = ("iso_depth_stack", "iso_flop_stack")
CONTROLS = ("single_loop", *STACKS)


def evaluate(run: ArmRun) -> dict:
    """Exact match per (hops, test loops) from the trainer's depth curve, the arm's size
    (parameters, forward FLOPs per token at its mean training loops); adaptive exits for the
    looped arms (more than one loop)."""
    curve = run.train_report["depth_curve"]
    accuracy = {split.split("=")[1]: {str(n): float(v["exact_match"]) for n, v in
                                      sorted(by_loops.items())}
                for split, by_loops in curve.items()}
    loops = mean_training_loops(run)
    result = {"accuracy": accuracy, "train_mean_loops": loops,
              "params": parameter_count(run.state.params),
              "flops_per_token": forward_flops(run.cfg, loops)}
    if run.cfg.loops.max_loops > 1:
        result["exits"] = _exit_sweep(run, 3 if run.quick else MAX_EXIT_LOOPS)
    return result


def _exit_sweep(run: ArmRun, max_loops: int) -> dict:
    """Per exit rule and hop count: mean exit loop and answer accuracy with the rule, and the
    accuracy of the same queries at ``max_loops`` fixed loops. Every split's queries run as
    one batch of full-length rows, each read at its answer (``lengths``: the exit rules see
    only the query's tokens), so each rule compiles once."""
    model = model_from_state(run.plan, run.state)
    model.eval()
    fixed = nnx.jit(lambda m, ids, lengths: m(ids, max_loops, lengths=lengths, last_only=True))
    adaptive = {rule: nnx.jit(lambda m, ids, lengths, spec=LoopSpec(
                    jnp.int32(max_loops), exit=rule, threshold=threshold):
                              m(ids, spec, lengths=lengths, last_only=True, return_info=True))
                for rule, threshold in EXIT_RULES.items()}
    splits = data_lib.eval_splits(run.cfg.data)
    queries = [_answer_queries(run.cfg, split) for split in splits]
    split_of = np.repeat(np.arange(len(splits)), [len(answers) for _, _, answers in queries])
    ids, lengths, answers = (np.concatenate(part) for part in zip(*queries))
    ids, lengths = jnp.asarray(ids), jnp.asarray(lengths)
    with run.plan.context():
        right_at_max = np.argmax(fixed(model, ids, lengths)[:, -1], -1) == answers
        outcomes = {}
        for rule, run_rule in adaptive.items():
            logits, info, _ = run_rule(model, ids, lengths)
            outcomes[rule] = (np.asarray(info.loops_run),
                              np.argmax(logits[:, -1], -1) == answers)
    result = {}
    for rule, (exits, right) in outcomes.items():
        per_hops = {split.split("=")[1]: {
            "mean_exit": float(np.mean(exits[split_of == i])),
            "accuracy": float(np.mean(right[split_of == i])),
            "accuracy_at_max": float(np.mean(right_at_max[split_of == i]))}
            for i, split in enumerate(splits)}
        result[rule] = {"threshold": EXIT_RULES[rule], "max_loops": max_loops,
                        **{key: float(np.mean([v[key] for v in per_hops.values()]))
                           for key in ("mean_exit", "accuracy", "accuracy_at_max")},
                        "per_hops": per_hops}
    return result


def _answer_queries(cfg: TrainConfig, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The queries of a split's first ``eval.batches`` batches (rows without a scored token,
    padding, left out) as (ids (N, seq_len), lengths (N,): the tokens up to the answer's
    position, answers (N,))."""
    batches = data_lib.eval_batches(cfg.data, split)[:cfg.eval.batches]
    mask = np.concatenate([b["loss_mask"] for b in batches]) > 0
    rows = np.flatnonzero(mask.any(axis=1))
    ids = np.concatenate([b["inputs"] for b in batches])[rows]
    answer_at = mask.shape[1] - 1 - np.argmax(mask[rows, ::-1], axis=1)   # last scored position
    answers = np.concatenate([b["targets"] for b in batches])[rows, answer_at]
    return ids, (answer_at + 1).astype(np.int32), answers


# ---------------------------------------------------------------------------- scores
def best_over_loops(matrix: dict, hops: list[str]) -> float:
    """The best test-loop count's accuracy averaged over ``hops`` (one budget for all)."""
    columns = next(iter(matrix.values())).keys()
    return max(float(np.mean([matrix[k][t] for k in hops])) for t in columns)


def worst_in_distribution(matrix: dict) -> float:
    """The worst hop count of 1..K_train at the loop count best for that worst hop."""
    seen = [k for k in matrix if int(k) <= TRAIN_MAX_HOPS]
    columns = next(iter(matrix.values())).keys()
    return max(min(matrix[k][t] for k in seen) for t in columns)


def exit_against_fixed(arm: dict, rule: str) -> dict:
    """The rule's mean exit against the cheapest fixed test-loop budget whose accuracy over
    the same hop counts is at least the rule's minus one point."""
    exits = arm["exits"][rule]
    hops = list(exits["per_hops"])
    budgets = sorted(int(t) for t in arm["accuracy"][hops[0]])
    fixed = {t: float(np.mean([arm["accuracy"][k][str(t)] for k in hops])) for t in budgets}
    enough = [t for t in budgets if fixed[t] >= exits["accuracy"] - 0.01]
    budget = enough[0] if enough else None
    return {"rule": rule, "mean_exit": exits["mean_exit"], "accuracy": exits["accuracy"],
            "fixed_budget": budget, "fixed_accuracy": fixed[budget] if budget else None,
            "saving": 1 - exits["mean_exit"] / budget if budget else None}


# ---------------------------------------------------------------------------- report
def report(results: dict, out: str) -> str:
    """E1's table (``khop_report``) with its targets."""
    return khop_report(results, out, "E1", _targets(results, list(results["arms"])))


def khop_report(results: dict, out: str, label: str, targets: list[dict],
                sections: list[str] | None = None) -> str:
    """The targets table, per-arm sizes, mean accuracy matrices with the spread over seeds,
    ``sections`` (lines), the exits against the best fixed budget; writes accuracy.png (seed
    means, its title starting with ``label``)."""
    arms = list(results["arms"])
    results["train_max_hops"] = TRAIN_MAX_HOPS
    results["exits"] = {name: arm["exits"] for name, arm in results["arms"].items()
                        if "exits" in arm}
    means = {name: mean_matrix(seed_values(results, name, lambda a: a["accuracy"]))
             for name in arms}
    results["mean_accuracy"] = means
    results["targets"] = targets
    n_seeds = len(results["seeds"])
    plots.accuracy_grid(means, os.path.join(out, "accuracy.png"),
                        f"{label} k-hop exact match by test loops (trained on <= {TRAIN_MAX_HOPS} "
                        f"hops; mean of {n_seeds} seed{'s' if n_seeds > 1 else ''})")
    lines = report_head(results, targets)
    lines += ["", "| arm | parameters | forward FLOPs / token (at its mean training loops) | "
                  "mean training loops |", "|---|---|---|---|"]
    for name in arms:
        arm = results["arms"][name]
        lines.append(f"| {name} | {arm['params']:,} | {arm['flops_per_token'] / 1e6:.3f} M | "
                     f"{arm['train_mean_loops']:.2f} |")
    for name in arms:
        matrices = seed_values(results, name, lambda a: a["accuracy"])
        lines += ["", f"**{name}**: exact match by hops (rows) and test loops (columns), mean "
                      f"over {len(matrices)} seed(s)" + (" (min-max)" if len(matrices) > 1
                                                         else ""), ""]
        lines += spread_matrix(matrices, "hops")
    lines += sections or []
    for name in results["exits"]:
        lines += ["", f"**{name}, adaptive exits** (at most "
                      f"{results['exits'][name]['kl']['max_loops']} loops) against the cheapest "
                      "fixed budget within 1 point of the rule's accuracy (per seed)", "",
                  "| rule | seed | mean exit | accuracy | fixed budget | its accuracy | saving |",
                  "|---|---|---|---|---|---|---|"]
        for rule in EXIT_RULES:
            for seed, one in results["seeds"].items():
                if name not in one["arms"]:
                    continue
                c = exit_against_fixed(one["arms"][name], rule)
                budget = ("none | - | -" if c["fixed_budget"] is None else
                          f"{c['fixed_budget']} | {c['fixed_accuracy']:.1%} | {c['saving']:.0%}")
                lines.append(f"| {rule} | {seed} | {c['mean_exit']:.1f} | {c['accuracy']:.1%} "
                             f"| {budget} |")
    lines += ["", "![accuracy](accuracy.png)"]
    return "\n".join(lines)


def reaches_twice_the_hops(results: dict, looped: str) -> dict:
    """The target ">= 90% at 2 K hops with more test loops" (Kohli) for ``looped``, at its
    best test-loop count in every seed (2 K must have been evaluated)."""
    double = str(2 * TRAIN_MAX_HOPS)
    far = seed_values(results, looped, lambda a: max(a["accuracy"][double].values()))
    return {"claim": f"{looped}: >= 90% at {double} hops (2 K) with more test loops (Kohli)",
            "ours": f"{spread(far)} (best test-loop count)", "met": min(far) >= 0.90}


def beats_stacks(results: dict, looped: str, stacks: list[str], shown: list[str]) -> dict:
    """The target "``looped`` beats ``stacks`` beyond training": mean exact match over
    K+1..2K hops at each arm's best loop count, met when every looped seed is above every
    stack seed; the ``shown`` controls (the stacks among them) are listed beside it."""
    beyond = [k for k in results["arms"][looped]["accuracy"]
              if TRAIN_MAX_HOPS < int(k) <= 2 * TRAIN_MAX_HOPS]

    def score(arm):
        return best_over_loops(arm["accuracy"], beyond)
    ours = seed_values(results, looped, score)
    parts, met = [f"{looped} {spread(ours)}"], True
    for control in shown:
        values = seed_values(results, control, score)
        parts.append(f"{control} {spread(values)}")
        if control in stacks:
            met &= min(ours) > max(values)
    return {"claim": f"{looped} beats {' and '.join(stacks)} beyond training "
                     f"({beyond[0]}..{beyond[-1]} hops, mean exact match at each arm's best "
                     "loop count)",
            "ours": "; ".join(parts) + " (met: every looped seed above every stack seed)",
            "met": bool(met)}


def _targets(results: dict, arms: list[str]) -> list[dict]:
    found = []
    double = str(2 * TRAIN_MAX_HOPS)
    for name in LOOPED_ARMS:
        if name not in arms:
            continue
        seen = seed_values(results, name, lambda a: worst_in_distribution(a["accuracy"]))
        found.append({"claim": f"{name}: held-out (leak-free) in-distribution hops "
                               f"(1..{TRAIN_MAX_HOPS}) >= 95%",
                      "ours": f"{spread(seen)} (worst hop count at its best loop count; mean "
                              "(min-max) over seeds)", "met": min(seen) >= 0.95})
        if double in results["arms"][name]["accuracy"]:
            found.append(reaches_twice_the_hops(results, name))
    stacks = [c for c in STACKS if c in arms]
    for name in ("looped_random", "looped_fixed"):
        if name in arms and stacks:
            found.append(beats_stacks(results, name, stacks,
                                      [c for c in CONTROLS if c in arms]))
    if "looped_random" in arms and "exits" in results["arms"]["looped_random"]:
        options = []
        for rule in EXIT_RULES:
            checks = seed_values(results, "looped_random",
                                  lambda a, r=rule: exit_against_fixed(a, r))
            savings = [c["saving"] if c["saving"] is not None else float("-inf")
                       for c in checks]
            options.append((min(savings), rule, savings, checks))
        worst, rule, savings, checks = max(options)
        shown = [s for s in savings if np.isfinite(s)]
        found.append({"claim": "an exit rule: mean exit >= 30% below the cheapest fixed budget "
                               "that is as accurate (within 1 point)",
                      "ours": f"{rule}: {spread(shown) if shown else 'no budget'} fewer loops "
                              f"(budgets {[c['fixed_budget'] for c in checks]}, mean exits "
                              f"{[round(c['mean_exit'], 1) for c in checks]})",
                      "met": worst >= 0.30})
    return found


EXPERIMENT = Experiment(
    name="depth_extrapolation",
    claim="A looped model trained on <= K hops answers more hops when given more test-time "
          "loops; the same model at 1 loop, and stacks of distinct layers of equal depth or "
          "equal FLOPs, cannot (Kohli et al.)",
    base=CPU_BASE, base_overrides=BASE, quick_overrides=QUICK, arms=ARMS,
    pod=PodPreset(pod.BASE, POD_BASE, arms(pod.BASE, POD_BASE), pod.TOPOLOGY, pod.MESH),
    evaluate=evaluate, report=report, quick_arms=("looped_random", "single_loop"),
    seeds=SEEDS)
