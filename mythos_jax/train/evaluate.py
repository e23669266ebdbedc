"""Evaluation at several test-time loop counts: the depth curve.

``evaluate`` runs every eval split of the data (held-out text, or task splits such as
``hops=6``) at every loop count in ``eval.loops`` and returns
``{split: {loops: {"loss", "accuracy", "exact_match"}}}`` (accuracy over loss-masked tokens,
exact match over whole answers). ``depth_curve_table`` prints it; ``plot_depth_curve`` writes
the PNG.
"""

from __future__ import annotations

import functools
import itertools
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mythos_jax import paths
from mythos_jax.train import data as data_lib
from mythos_jax.train.step import TrainPlan, TrainState, token_terms


@functools.lru_cache(maxsize=16)
def eval_fn(plan: TrainPlan, loops: int):
    """Jitted (params, buffers, batch) -> (5,) float32 sums over the (global) batch at
    ``loops``: summed token NLL, right tokens, scored tokens, exactly-right sequences and
    sequences with a scored token (``EVAL_SUMS``). Rows without a scored token (padding) add
    nothing."""
    def run(params, buffers, batch):
        model = nnx.merge(plan.graphdef, params, buffers)
        model.eval()
        logits = model(batch["inputs"], loops)
        return eval_sums(logits, batch["targets"], batch["loss_mask"])

    return jax.jit(run, in_shardings=(plan.shardings.params, plan.shardings.buffers,
                                      plan.batch_sharding))


EVAL_SUMS = ("nll", "right", "tokens", "exact", "sequences")


def eval_sums(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """(5,) sums of ``EVAL_SUMS`` from logits (B, T, V), targets and loss mask (B, T)."""
    nll, right = token_terms(logits, targets)
    scored = mask > 0
    answered = jnp.any(scored, axis=1)
    exact = jnp.all(right | ~scored, axis=1) & answered
    weight = scored.astype(jnp.float32)
    return jnp.stack([jnp.sum(nll * weight), jnp.sum(right * weight), jnp.sum(weight),
                      jnp.sum(exact, dtype=jnp.float32), jnp.sum(answered, dtype=jnp.float32)])


def means_from_sums(sums: np.ndarray, split: str) -> dict[str, float]:
    """Token-weighted loss and accuracy, and exact match over answered sequences, from the
    ``EVAL_SUMS`` added over a split's batches."""
    nll, right, tokens, exact, sequences = (float(v) for v in sums)
    if tokens == 0:
        raise ValueError(f"eval split {split!r} has no scored token in its batches (all "
                         f"padding: too little held-out data?)")
    return {"loss": nll / tokens, "accuracy": right / tokens, "exact_match": exact / sequences,
            "tokens": int(tokens), "sequences": int(sequences)}


def global_batch(plan: TrainPlan, local: dict) -> dict:
    """This process's rows -> global arrays sharded over the batch axes. Token ids are
    range-checked here, on the host (the jitted step does not check them)."""
    local = {name: np.asarray(v) for name, v in local.items()}
    vocab = plan.model_cfg.vocab_size
    for name in ("inputs", "targets"):
        ids = local[name]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"batch {name!r} holds token ids outside [0, vocab_size={vocab}): "
                             f"min {int(ids.min())}, max {int(ids.max())} (does the data "
                             f"match the model's vocabulary?)")
    return {name: jax.make_array_from_process_local_data(plan.batch_sharding, v)
            for name, v in local.items()}


def evaluate(plan: TrainPlan, state: TrainState, loops=None,
             n_batches: int | None = None) -> dict[str, dict[int, dict[str, float]]]:
    """Per eval split and loop count in ``loops`` (default ``eval.loops``): loss and token
    accuracy averaged over every scored token of the split's first ``n_batches`` batches
    (padding rows count for nothing, so more batches of padding change nothing), exact match
    over the sequences that have a scored token; the same on any number of processes (the
    sums are over global batches)."""
    cfg = plan.cfg
    loops = cfg.eval.loops if loops is None else loops
    n_batches = cfg.eval.batches if n_batches is None else n_batches
    results: dict[str, dict[int, dict[str, float]]] = {}
    for split in data_lib.eval_splits(cfg.data):
        batches = list(itertools.islice(data_lib.eval_batches(cfg.data, split, jax.process_index(),
                                                   jax.process_count()), n_batches))
        if not batches:
            raise ValueError(f"eval split {split!r} has no batches (too little held-out "
                             f"data for data.batch_size={cfg.data.batch_size})")
        global_batches = [global_batch(plan, b) for b in batches]
        results[split] = {}
        for n in loops:
            run = eval_fn(plan, int(n))
            with plan.context():   # one host transfer per loop count, not one per batch
                per_batch = [run(state.params, state.buffers, batch) for batch in global_batches]
            sums = np.asarray(jax.device_get(per_batch), np.float64).sum(axis=0)
            results[split][int(n)] = means_from_sums(sums, split)
    return results


def depth_curve_table(results: dict) -> str:
    """A text table: one row per (split, loop count)."""
    lines = [f"{'split':<14}{'loops':>6}{'loss':>10}{'accuracy':>10}{'exact':>8}"]
    for split, by_loops in results.items():
        for n, values in sorted(by_loops.items()):
            lines.append(f"{split:<14}{n:>6}{values['loss']:>10.4f}"
                         f"{values['accuracy']:>10.4f}{values['exact_match']:>8.3f}")
    return "\n".join(lines)


def plot_depth_curve(results: dict, path, title: str = "") -> str:
    """Loss (left) and accuracy (right) against test-time loops, one line per split, as a
    PNG at ``path`` (local or a bucket URL); returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for split, by_loops in results.items():
        counts = sorted(by_loops)
        loss_ax.plot(counts, [by_loops[n]["loss"] for n in counts], marker="o", label=split)
        acc_ax.plot(counts, [by_loops[n]["accuracy"] for n in counts], marker="o", label=split)
    for ax, name in ((loss_ax, "loss"), (acc_ax, "token accuracy")):
        ax.set_xlabel("test-time loops")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("\n".join(textwrap.wrap(title or "depth curve", 120)), fontsize=9)
    return paths.write_png(fig, path)

