"""The looped MoE's routing iteration by iteration, on given tokens (E5).

    routing = routing_by_loop(model, ids, 16)       # {"1": {...}, ..., "16": {...}}
    routing["3"]   # {"load": [share per expert], "max_over_mean", "effective_experts",
                   #  "topk_changed", "z_loss"}

Every iteration's top-K expert ids come from one traced forward (``model(ids, n, trace=True)``,
``LoopRecord.expert_ids``). From them: the share of the (token, slot) assignments each expert
gets at each iteration (``load_by_loop``): its max / mean (1 when balanced, E / K as soon as one
expert is in every token's top-K) and its effective number of experts (exp of its entropy: E
when balanced, K when every token picks the same K); and the share of tokens whose top-K *set*
differs from the previous iteration's (``topk_changed``; None at the first iteration).
The router z-loss per iteration is not in the trace: a forward's ``LoopInfo.moe.z_loss`` is its
mean over the iterations run, so forwards at 1 .. n loops (one run-time count, one program)
give iteration t's as ``t * mean_t - (t - 1) * mean_{t-1}`` (``z_loss_by_loop``). Both rest on
the first t iterations of a forward not depending on how many follow (no exit rule: true).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mythos_jax.model import OpenMythos


def load_by_loop(expert_ids: np.ndarray, n_experts: int) -> np.ndarray:
    """expert_ids (n, ..., K) int -> (n, E): each expert's share of iteration t's (token,
    slot) assignments (every row sums to 1)."""
    flat = np.asarray(expert_ids).reshape(expert_ids.shape[0], -1)
    counts = np.stack([np.bincount(row, minlength=n_experts) for row in flat])
    return counts / flat.shape[1]


def max_over_mean(load: np.ndarray) -> np.ndarray:
    """load (..., E) -> (...): the busiest expert's load over the mean (1 = balanced)."""
    return np.max(load, axis=-1) / np.mean(load, axis=-1)


def effective_experts(load: np.ndarray) -> np.ndarray:
    """load (..., E) shares -> (...): exp(entropy), E when balanced, K when every token picks
    the same K (max / mean is E / K as soon as one expert is in every token's top-K)."""
    logs = np.log(np.where(load > 0, load, 1.0))
    return np.exp(-np.sum(load * logs, axis=-1))


def topk_changed(expert_ids: np.ndarray) -> np.ndarray:
    """expert_ids (n, ..., K) -> (n - 1,): at iterations 2 .. n, the share of tokens whose
    set of K experts differs from the previous iteration's (order within the K ignored)."""
    chosen = np.sort(np.asarray(expert_ids), axis=-1)
    changed = np.any(chosen[1:] != chosen[:-1], axis=-1)               # (n - 1, ...)
    return changed.reshape(changed.shape[0], -1).mean(axis=1)


def z_loss_by_loop(model: OpenMythos, ids: jax.Array, n_loops: int) -> np.ndarray:
    """Router z-loss (mean over the sequences of ids (B, T)) of iterations 1 .. n_loops, (n,),
    from the running means of forwards at 1 .. n loops (module docstring)."""
    mean_over_run = nnx.jit(lambda m, ids, n: m(ids, n, return_info=True).info.moe.z_loss)
    running = np.array([float(mean_over_run(model, ids, jnp.int32(t)))
                        for t in range(1, n_loops + 1)])
    totals = running * np.arange(1, n_loops + 1)
    return np.diff(totals, prepend=0.0)


def routing_by_loop(model: OpenMythos, ids: jax.Array, n_loops: int) -> dict[str, dict]:
    """Per iteration 1 .. n_loops of a forward of ids (B, T) (keys "1" .. "n"): ``load`` (E
    shares), ``max_over_mean``, ``effective_experts``, ``topk_changed`` (None at "1") and
    ``z_loss``."""
    trace = nnx.jit(lambda m, ids: m(ids, n_loops, trace=True).loops.expert_ids)
    expert_ids = np.asarray(trace(model, ids))                          # (n, B, T, K)
    load = load_by_loop(expert_ids, model.cfg.n_experts)
    changed = [None, *map(float, topk_changed(expert_ids))]
    z_loss = z_loss_by_loop(model, ids, n_loops)
    return {str(t + 1): {"load": load[t].tolist(), "max_over_mean": float(max_over_mean(load[t])),
                         "effective_experts": float(effective_experts(load[t])),
                         "topk_changed": changed[t], "z_loss": float(z_loss[t])}
            for t in range(n_loops)}
