"""The loop drivers: how the shared block's iterations are laid out in XLA.

  run_static    a Python int count: one ``lax.scan`` (the parity path; decode and prefill;
                traced: each iteration's ``LoopRecord`` as the scan's output)
  run_dynamic   counts chosen at run time, optional early exit: one ``lax.while_loop``
  run_training  differentiable run-time counts: truncated (``backprop_depth``) or masked full
                backprop (``max_loops``)
Every driver takes per-sequence counts: a finished sequence is frozen with
``where(active, new, old)`` while the others continue, and its router statistics stop counting.
``block`` is the model's ``RecurrentBlock``; ``ctx`` the per-forward context
(``LoopContext``). Pick one with :func:`mythos_jax.loops.run_loops`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mythos_jax.inference.cache import row_slots, slice_rows, update_rows
from mythos_jax.layers.recurrence import (LoopRecord, LoopState, RecurrentBlock, TracePoints,
                                          relative_change)
from mythos_jax.loops.spec import LoopSpec, per_sequence
from mythos_jax.modes import ExitRule, LoopRemat

KL_ENTROPY_BOUND = 3.0     # nats; Kohli et al.'s entropy condition of the "kl_entropy" exit


class LoopResult(NamedTuple):
    """What a driver returns: the final state, the iterations run per sequence (B,) int32,
    the updated per-depth cache of the recurrent block (None without one) and, when traced,
    every iteration's :class:`LoopRecord` stacked (n, ...)."""
    state: LoopState
    loops_run: jax.Array
    cache: dict | None
    trace: LoopRecord | None = None


class LoopContext(NamedTuple):
    """What every iteration needs besides the state: RoPE cos/sin, the attention span
    (``layers.attention.KeySpan``), a dropout key, and which positions are tokens (B, T)
    bool, not padding (None: all): the exit rules read only those."""
    rope: tuple[jax.Array, jax.Array]
    span: object
    key: jax.Array | None
    real: jax.Array | None = None


# ---------------------------------------------------------------------------- helpers
def _step_key(ctx: LoopContext, t) -> jax.Array | None:
    return None if ctx.key is None else jax.random.fold_in(ctx.key, t)


def _freeze(active: jax.Array, new: LoopState, old: LoopState) -> LoopState:
    """``new`` for the sequences where ``active`` (B,) is True, ``old`` for the others; the
    router statistics (batch totals, masked by the step itself) come from ``new``."""
    per_sequence = jax.tree.map(
        lambda n, o: jnp.where(active.reshape(active.shape + (1,) * (n.ndim - 1)), n, o),
        new._replace(moe=None), old._replace(moe=None))
    return per_sequence._replace(moe=new.moe)


def _masked_step(block: RecurrentBlock, state: LoopState, e, t, active, ctx, cache=None,
                 index=None) -> tuple[LoopState, dict | None]:
    """One iteration for the sequences where ``active`` (B,) is True; the others keep state.
    With a layer ``cache``, the returned cache holds every sequence's keys (a stopped
    sequence's from its frozen state); ``_write_depth`` keeps only the active ones'."""
    new, cache = block.step(state, e, jnp.maximum(t, 0), ctx.rope, ctx.span, _step_key(ctx, t),
                            cache, index, active)
    return _freeze(active, new, state), cache


def _read_depth(depth_caches, t):
    """Depth t's cache; a stack with fewer depths than loops is shared (slot t mod size,
    Huginn's KV sharing)."""
    if depth_caches is None:
        return None
    return jax.tree.map(lambda c: c[t % c.shape[0]], depth_caches)


def _write_depth(depth_caches, layer_cache, t, index, length: int, active=None):
    """Write each sequence's rows ``index .. index + length`` of depth t's updated cache into
    the stack (``index`` (B,), None: 0); with ``active`` (B,) bool, only the active
    sequences' rows (a stopped one keeps its own)."""
    if depth_caches is None:
        return None

    def write(c, new):
        slot = t % c.shape[0]
        starts = jnp.zeros(c.shape[1], jnp.int32) if index is None else index
        at = row_slots(new, starts, length, axis=1)
        rows = new[at]                                                       # (B, length, ...)
        at = (slot,) + at
        if active is not None:
            rows = jnp.where(active.reshape((-1,) + (1,) * (rows.ndim - 1)), rows, c[at])
        return c.at[at].set(rows.astype(c.dtype))

    return jax.tree.map(write, depth_caches, layer_cache)


def _remat(body: Callable, remat: LoopRemat) -> Callable:
    return body if remat.policy is None else jax.checkpoint(body, policy=remat.policy)


# ---------------------------------------------------------------------------- drivers
def run_static(block: RecurrentBlock, e: jax.Array, ctx: LoopContext, spec: LoopSpec,
               cache: dict | None = None, index=None,
               trace: TracePoints | None = None) -> LoopResult:
    """Exactly ``spec.count`` (an int) iterations in one scan (OpenMythos's loop, minus its
    early break). ``cache``: the recurrent block's per-depth caches (leading axis: depth
    slots), used and updated at depth t by iteration t (prefill / decode). ``trace`` (no
    cache): the scan also outputs each iteration's ``LoopRecord`` at those points; without
    it the scan outputs nothing per iteration."""
    n_loops = spec.count
    def body(carry, t):
        state, depth_caches = carry
        if trace is not None:            # no cache; the record is the scan's output
            state, record = block.traced_step(state, e, t, ctx.rope, ctx.span,
                                              _step_key(ctx, t), trace)
            return (state, depth_caches), record
        state, layer_cache = block.step(state, e, t, ctx.rope, ctx.span, _step_key(ctx, t),
                                        _read_depth(depth_caches, t), index)
        return (state, _write_depth(depth_caches, layer_cache, t, index, e.shape[1])), None

    (final, cache), records = jax.lax.scan(_remat(body, block.remat_policy),
                                           (block.start(e, n_loops), cache),
                                           jnp.arange(n_loops, dtype=jnp.int32))
    return LoopResult(final, jnp.full((e.shape[0],), n_loops, jnp.int32), cache, records)


def run_dynamic(block: RecurrentBlock, e: jax.Array, ctx: LoopContext, spec: LoopSpec,
                decode: Callable[[jax.Array], jax.Array] | None = None,
                cache: dict | None = None, index=None) -> LoopResult:
    """Up to ``spec.count`` (scalar or (B,), traced or not) iterations in a while loop.

    ``spec.exit``: None (run every count), "act" (a sequence stops once all its positions halted:
    same output as the static loop, fewer iterations), "kl" (stop when the largest KL over
    positions between successive next-token distributions, ``decode(readout)``, falls below
    ``spec.threshold``), "kl_entropy" (Kohli et al.: that KL below the threshold and every
    position's entropy below ``KL_ENTROPY_BOUND``), "delta" (stop when
    ||h_t - h_{t-1}|| / ||h_t|| < threshold). A sequence that stopped is frozen; the loop
    ends when every sequence stopped. Not reverse-differentiable (use ``run_training``).
    With a ``cache``, a sequence writes only the depths it runs, and its depths past its last
    iteration get that iteration's keys, so later tokens always find keys and a sequence's
    cache is the one it would have decoded alone (whatever its batch-mates run).
    """
    batch = e.shape[0]
    counts = per_sequence(spec.count, batch)
    exit, threshold = spec.exit, spec.threshold
    start = block.start(e)
    uses_kl = exit is not None and exit.decodes
    real = (jnp.ones(start.h.shape[:2], bool) if ctx.real is None else ctx.real)  # (B, T)
    weights = real[..., None].astype(start.h.dtype)
    previous = (decode(block.output(start)) if uses_kl
                else jnp.zeros(start.h.shape[:2] + (0,)))

    def cond(carry):
        t, _, _, done, _, _ = carry
        return (t < jnp.max(counts)) & ~jnp.all(done)

    def body(carry):
        t, state, loops_run, done, previous, depth_caches = carry
        active = ~done & (t < counts)
        new, layer_cache = _masked_step(block, state, e, t, active, ctx,
                                        _read_depth(depth_caches, t), index)
        depth_caches = _write_depth(depth_caches, layer_cache, t, index, e.shape[1], active)
        if exit == ExitRule.ACT:
            converged = jnp.all(new.halted | ~real, axis=1)
        elif exit == ExitRule.DELTA:
            converged = relative_change(new.h * weights, state.h * weights) < threshold
        elif uses_kl:
            log_p = decode(block.output(new))
            kl = jnp.sum(jnp.exp(log_p) * (log_p - previous), axis=-1)      # (B, T)
            converged = (jnp.max(jnp.where(real, kl, 0.0), axis=1) < threshold) & (t > 0)
            if exit == ExitRule.KL_ENTROPY:
                entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)        # (B, T)
                converged = converged & (jnp.max(jnp.where(real, entropy, 0.0), axis=1)
                                         < KL_ENTROPY_BOUND)
            previous = jnp.where(active[:, None, None], log_p, previous)
        else:
            converged = jnp.zeros((batch,), bool)
        loops_run = loops_run + active.astype(jnp.int32)
        done = done | (t + 1 >= counts) | (active & converged)
        return t + 1, new, loops_run, done, previous, depth_caches

    init = (jnp.int32(0), start, jnp.zeros((batch,), jnp.int32), counts < 1, previous, cache)
    t_end, final, loops_run, _, _, cache = jax.lax.while_loop(cond, body, init)
    return LoopResult(final, loops_run, _fill_unrun_depths(cache, loops_run, index, e.shape[1]))


def _fill_unrun_depths(depth_caches, loops_run, index, length: int):
    """Copy each sequence's rows of its last run depth (``loops_run`` (B,) - 1) into its
    depths >= loops_run."""
    if depth_caches is None:
        return None
    batch = jnp.arange(loops_run.shape[0])

    def fill(c):
        if c.shape[0] == 1:        # one shared depth slot: nothing to fill
            return c
        rows = slice_rows(c, index, length, axis=2)                       # (L, B, T, ...)
        last = rows[jnp.clip(loops_run - 1, 0, c.shape[0] - 1), batch]    # (B, T, ...)
        unrun = jnp.arange(c.shape[0])[:, None] >= loops_run[None, :]      # (L, B)
        rows = jnp.where(unrun.reshape(unrun.shape + (1,) * (c.ndim - 2)), last[None], rows)
        return update_rows(c, rows, index, axis=2)

    return jax.tree.map(fill, depth_caches)


def run_training(block: RecurrentBlock, e: jax.Array, ctx: LoopContext,
                 spec: LoopSpec) -> LoopResult:
    """Differentiable loop for counts drawn at run time (scalar or (B,)), compiled once; no
    cache (training).

    ``spec.backprop_depth=k``: iterations ``t < n - k`` run in a while loop on a stop-gradient copy
    of the block (no activations kept), the last k in a scan rematerialised per
    ``cfg.loop_remat``; sequence i uses loop indices ``n_i - k .. n_i - 1`` there (those < 0
    are skipped when n_i < k). Memory does not depend on n.
    ``backprop_depth=None``: a masked scan over ``spec.max_loops`` iterations (full
    backprop).
    """
    counts = per_sequence(spec.count, e.shape[0])
    backprop_depth, max_loops = spec.backprop_depth, spec.max_loops
    if backprop_depth is None:
        def full_body(state, t):
            return _masked_step(block, state, e, t, t < counts, ctx)[0], None

        final, _ = jax.lax.scan(_remat(full_body, block.remat_policy),
                                block.start(e, max_loops), jnp.arange(max_loops, dtype=jnp.int32))
        return LoopResult(final, jnp.minimum(counts, max_loops), None)

    free_counts = counts - backprop_depth                                  # no-grad loops
    graphdef, weights = nnx.split(block)
    frozen = nnx.merge(graphdef, jax.tree.map(jax.lax.stop_gradient, weights))
    frozen_e = jax.lax.stop_gradient(e)

    def free_body(carry):
        t, state = carry
        return t + 1, _masked_step(frozen, state, frozen_e, t, t < free_counts, ctx)[0]

    _, state = jax.lax.while_loop(lambda c: c[0] < jnp.max(free_counts), free_body,
                                  (jnp.int32(0), block.start(frozen_e, max_loops)))
    # Sequences with n_i <= k ran no free loop: they start from the differentiable h_0 = e,
    # so that k >= n is exactly full backprop.
    state = _freeze(free_counts > 0, jax.lax.stop_gradient(state), block.start(e, max_loops))

    def grad_body(state, j):
        t = free_counts + j                                                # (B,)
        return _masked_step(block, state, e, t, t >= 0, ctx)[0], None

    final, _ = jax.lax.scan(_remat(grad_body, block.remat_policy), state,
                            jnp.arange(backprop_depth, dtype=jnp.int32))
    return LoopResult(final, counts, None)


