"""How often the shared block runs, and how gradients flow through the loop.

Drivers (called by ``OpenMythos.__call__``; ``block`` is its ``RecurrentBlock``):
  run_static(block, e, ctx, n)          n a Python int: one ``lax.scan``; the parity path.
  run_dynamic(block, e, ctx, n, exit)   n an array, scalar or per sequence (B,), chosen at run
                                        time: one ``lax.while_loop`` compiled for every n, with
                                        optional early exit ("act", "kl", "delta").
  run_training(block, e, ctx, n, backprop_depth, max_loops)
                                        differentiable: with ``backprop_depth=k`` the first
                                        n - k loops run in a no-grad while loop and the last k
                                        in a rematerialised scan; without it a masked scan to
                                        the static ``max_loops`` (full backprop).
Every driver takes per-sequence counts: a finished sequence is frozen with
``where(active, new, old)`` while the others continue, and its router statistics stop counting.

Depth samplers for training (``mythos_jax/schedules.py``, re-exported here): ``Fixed``,
``Uniform``, ``Poisson``, ``LogNormalPoisson`` and ``Curriculum``; ``sample_loops`` draws from
one of them or from a user function ``f(step, key) -> count(s)``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mythos_jax.moe.stats import MoEStats
from mythos_jax.layers.recurrence import LoopState, RecurrentBlock
from mythos_jax.schedules import (  # noqa: F401  (re-exported: loops.Fixed, ...)
    Curriculum, Fixed, LogNormalPoisson, Poisson, Schedule, Uniform)

EXIT_RULES = ("act", "kl", "kl_entropy", "delta")
KL_ENTROPY_BOUND = 3.0     # nats; Kohli et al.'s entropy condition of the "kl_entropy" exit

# What the backward pass keeps from each loop iteration (``MythosConfig.loop_remat``).
REMAT_POLICIES = {
    "none": None,                                           # keep every intermediate
    "dots": jax.checkpoint_policies.dots_saveable,          # keep matmul outputs only
    "full": jax.checkpoint_policies.nothing_saveable,       # keep only the loop carry
}


class LoopContext(NamedTuple):
    """What every iteration needs besides the state: RoPE cos/sin, the mask, a dropout key."""
    rope: tuple[jax.Array, jax.Array]
    mask: jax.Array
    key: jax.Array | None


class LoopInfo(NamedTuple):
    """What the loop did: iterations run per sequence (B,), the ponder cost (B, T), the router
    statistics over every iteration run (``moe.load_per_loop`` has
    L = max(cfg.max_loop_iters, the static loop bound: n for a static count, ``max_loops``)
    rows; deeper iterations, possible only without a static bound, add to the last row) and
    the RMS of the final hidden state per sequence (B,) (stability telemetry)."""
    loops_run: jax.Array
    ponder_cost: jax.Array
    moe: MoEStats
    state_rms: jax.Array


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
    With a layer ``cache`` every sequence's keys are written (a stopped sequence's from its
    frozen state), so later tokens find keys at every depth."""
    new, cache = block.step(state, e, jnp.maximum(t, 0), ctx.rope, ctx.mask, _step_key(ctx, t),
                            cache, index, active)
    return _freeze(active, new, state), cache


def _read_depth(depth_caches, t):
    """Depth t's cache; a stack with fewer depths than loops is shared (slot t mod size,
    Huginn's KV sharing)."""
    if depth_caches is None:
        return None
    return jax.tree.map(lambda c: c[t % c.shape[0]], depth_caches)


def _write_depth(depth_caches, layer_cache, t, index, length: int):
    """Write rows ``index .. index + length`` of depth t's updated cache into the stack."""
    if depth_caches is None:
        return None
    return jax.tree.map(
        lambda c, new: jax.lax.dynamic_update_slice(
            c, jax.lax.dynamic_slice_in_dim(new, index, length, axis=1)[None],
            (t % c.shape[0], 0, index) + (0,) * (c.ndim - 3)),
        depth_caches, layer_cache)


def _remat(body: Callable, policy: str) -> Callable:
    return body if policy == "none" else jax.checkpoint(body, policy=REMAT_POLICIES[policy])


def per_sequence(n_loops, batch: int) -> jax.Array:
    """A loop count (scalar or (B,)) as int32 (B,)."""
    n = jnp.asarray(n_loops)
    if not jnp.issubdtype(n.dtype, jnp.integer):
        raise TypeError(f"n_loops must be an integer count, got dtype {n.dtype}")
    if n.ndim > 1 or (n.ndim == 1 and n.shape[0] != batch):
        raise ValueError(f"n_loops must be a scalar or have shape (batch,)=({batch},), "
                         f"got shape {n.shape}")
    return jnp.broadcast_to(n.astype(jnp.int32), (batch,))


def check_counts(n_loops, max_loops: int | None = None) -> None:
    """n >= 1 (and <= max_loops): ValueError for concrete counts, a failing host check when
    traced (the error names the problem, the program never runs past the bound silently)."""
    if isinstance(n_loops, jax.core.Tracer):
        jax.debug.callback(_raise_if_bad_counts, jnp.min(n_loops), jnp.max(n_loops), max_loops)
    else:
        counts = np.asarray(n_loops)
        _raise_if_bad_counts(counts.min(), counts.max(), max_loops)


def _raise_if_bad_counts(lowest, highest, max_loops) -> None:
    if lowest < 1:
        raise ValueError(f"n_loops must be >= 1, got {int(lowest)}")
    if max_loops is not None and highest > max_loops:
        raise ValueError(f"n_loops {int(highest)} is above the compiled bound "
                         f"max_loops={max_loops}")


# ---------------------------------------------------------------------------- drivers
def run_static(block: RecurrentBlock, e: jax.Array, ctx: LoopContext, n_loops: int,
               cache: dict | None = None, index=None
               ) -> tuple[LoopState, jax.Array, dict | None]:
    """Exactly ``n_loops`` iterations in one scan (OpenMythos's loop, minus its early break).
    ``cache``: the recurrent block's per-depth caches (leading axis >= n_loops), used and
    updated at depth t by iteration t (prefill / decode)."""
    def body(carry, t):
        state, depth_caches = carry
        state, layer_cache = block.step(state, e, t, ctx.rope, ctx.mask, _step_key(ctx, t),
                                        _read_depth(depth_caches, t), index)
        return (state, _write_depth(depth_caches, layer_cache, t, index, e.shape[1])), None

    (final, cache), _ = jax.lax.scan(_remat(body, block.remat_policy),
                                     (block.start(e, n_loops), cache),
                                     jnp.arange(n_loops, dtype=jnp.int32))
    return final, jnp.full((e.shape[0],), n_loops, jnp.int32), cache


def run_dynamic(block: RecurrentBlock, e: jax.Array, ctx: LoopContext, n_loops,
                exit: str | None = None, threshold: float = 0.0,
                decode: Callable[[jax.Array], jax.Array] | None = None,
                cache: dict | None = None, index=None
                ) -> tuple[LoopState, jax.Array, dict | None]:
    """Up to ``n_loops`` (scalar or (B,), traced or not) iterations in a while loop.

    ``exit``: None (run every count), "act" (a sequence stops once all its positions halted:
    same output as the static loop, fewer iterations), "kl" (stop when the largest KL over
    positions between successive next-token distributions, ``decode(readout)``, falls below
    ``threshold``), "kl_entropy" (Kohli et al.: that KL below ``threshold`` and every
    position's entropy below ``KL_ENTROPY_BOUND``), "delta" (stop when ||h_t - h_{t-1}|| / ||h_t|| < ``threshold``). A sequence
    that stopped is frozen; the loop ends when every sequence stopped. Not reverse-
    differentiable (use ``run_training``). Returns the state, the iterations run (B,) and the
    updated per-depth ``cache`` (serving: depths past the last iteration run get the keys of
    the last one, so later tokens always find keys).
    """
    batch = e.shape[0]
    counts = per_sequence(n_loops, batch)
    start = block.start(e)
    uses_kl = exit in ("kl", "kl_entropy")
    previous = (decode(block.readout(start)) if uses_kl
                else jnp.zeros(start.h.shape[:2] + (0,)))

    def cond(carry):
        t, _, _, done, _, _ = carry
        return (t < jnp.max(counts)) & ~jnp.all(done)

    def body(carry):
        t, state, loops_run, done, previous, depth_caches = carry
        active = ~done & (t < counts)
        new, layer_cache = _masked_step(block, state, e, t, active, ctx,
                                        _read_depth(depth_caches, t), index)
        depth_caches = _write_depth(depth_caches, layer_cache, t, index, e.shape[1])
        if exit == "act":
            converged = jnp.all(new.halted, axis=1)
        elif exit == "delta":
            change = jnp.sqrt(jnp.sum(jnp.square(new.h - state.h), axis=(1, 2)))
            converged = change < threshold * jnp.sqrt(jnp.sum(jnp.square(new.h), axis=(1, 2)))
        elif uses_kl:
            log_p = decode(block.readout(new))
            kl = jnp.sum(jnp.exp(log_p) * (log_p - previous), axis=-1)      # (B, T)
            converged = (jnp.max(kl, axis=1) < threshold) & (t > 0)
            if exit == "kl_entropy":
                entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)        # (B, T)
                converged = converged & (jnp.max(entropy, axis=1) < KL_ENTROPY_BOUND)
            previous = jnp.where(active[:, None, None], log_p, previous)
        else:
            converged = jnp.zeros((batch,), bool)
        loops_run = loops_run + active.astype(jnp.int32)
        done = done | (t + 1 >= counts) | (active & converged)
        return t + 1, new, loops_run, done, previous, depth_caches

    init = (jnp.int32(0), start, jnp.zeros((batch,), jnp.int32), counts < 1, previous, cache)
    t_end, final, loops_run, _, _, cache = jax.lax.while_loop(cond, body, init)
    return final, loops_run, _fill_unrun_depths(cache, t_end, index, e.shape[1])


def _fill_unrun_depths(depth_caches, t_end, index, length: int):
    """Copy this call's rows of depth ``t_end - 1`` into every depth >= t_end."""
    if depth_caches is None:
        return None

    def fill(c):
        if c.shape[0] == 1:        # one shared depth slot: nothing to fill
            return c
        rows = jax.lax.dynamic_slice_in_dim(c, index, length, axis=2)     # (L, B, T, ...)
        unrun = (jnp.arange(c.shape[0]) >= t_end).reshape((-1,) + (1,) * (c.ndim - 1))
        rows = jnp.where(unrun, rows[jnp.maximum(t_end - 1, 0)][None], rows)
        return jax.lax.dynamic_update_slice_in_dim(c, rows, index, axis=2)

    return jax.tree.map(fill, depth_caches)


def run_training(block: RecurrentBlock, e: jax.Array, ctx: LoopContext, n_loops,
                 backprop_depth: int | None = None, max_loops: int | None = None
                 ) -> tuple[LoopState, jax.Array]:
    """Differentiable loop for counts drawn at run time (scalar or (B,)), compiled once.

    ``backprop_depth=k``: iterations ``t < n - k`` run in a while loop on a stop-gradient copy
    of the block (no activations kept), the last k in a scan rematerialised per
    ``cfg.loop_remat``; sequence i uses loop indices ``n_i - k .. n_i - 1`` there (those < 0
    are skipped when n_i < k). Memory does not depend on n.
    ``backprop_depth=None``: a masked scan over ``max_loops`` iterations (full backprop).
    """
    batch = e.shape[0]
    counts = per_sequence(n_loops, batch)
    if backprop_depth is None:
        if max_loops is None:
            raise ValueError("full backprop over a run-time loop count needs the static bound "
                             "max_loops (or give backprop_depth)")

        def full_body(state, t):
            return _masked_step(block, state, e, t, t < counts, ctx)[0], None

        final, _ = jax.lax.scan(_remat(full_body, block.remat_policy),
                                block.start(e, max_loops), jnp.arange(max_loops, dtype=jnp.int32))
        return final, jnp.minimum(counts, max_loops)

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
    return final, counts


# ---------------------------------------------------------------------------- depth samplers
def sample_loops(schedule: Schedule | Callable[[Any, jax.Array], Any], step, key: jax.Array,
                 batch: int) -> jax.Array:
    """Counts for this step from a :class:`Schedule` or a user function ``f(step, key)``
    returning a scalar or per-sequence (B,) integer count (jittable: step may be traced)."""
    if isinstance(schedule, Schedule):
        return schedule.sample(step, key, batch)
    if not callable(schedule):
        raise TypeError(f"expected a mythos_jax.loops.Schedule or a function (step, key) -> "
                        f"count(s), got {type(schedule).__name__}")
    return per_sequence(schedule(step, key), batch)
