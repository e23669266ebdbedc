"""How often the shared block runs, and how gradients flow through the loop.

A :class:`LoopSpec` (``spec.py``) says it: the count (static, or chosen at run time per
sequence), the exit rule, the backprop depth and the static bound; :func:`run_loops` is the
one entry point ``OpenMythos`` calls, which picks a driver (``drivers.py``) and returns a
:class:`LoopResult`. Depth samplers for training are in :mod:`mythos_jax.schedules`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax

from mythos_jax.moe.stats import MoEStats
from mythos_jax.layers.recurrence import LoopRecord, RecurrentBlock, TracePoints
from mythos_jax.loops.drivers import (KL_ENTROPY_BOUND, LoopContext, LoopResult, run_dynamic,
                                      run_static, run_training)
from mythos_jax.loops.spec import LoopSpec, per_sequence
from mythos_jax.modes import ACTMode, ExitRule

__all__ = ["KL_ENTROPY_BOUND", "LoopContext", "LoopInfo", "LoopRecord", "LoopResult",
           "LoopSpec", "TracePoints", "per_sequence", "resolve_spec", "run_loops"]


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


def resolve_spec(loops: LoopSpec, cfg, *, cached: bool = False, depth_slots: int | None = None,
                 shares_depths: bool = False, traced: bool = False) -> LoopSpec:
    """The one place a forward's LoopSpec is resolved and checked: its count defaults to the
    cache's ``depth_slots`` (unless it ``shares_depths``), else ``cfg.max_loop_iters``;
    ``exit="act"`` needs ACT halting; a cached forward (``cached``) needs a static count and
    nothing of training, equal to the cache's ``depth_slots`` unless it ``shares_depths`` (a
    depth the prompt never filled would be attended as zeros); a ``traced`` forward needs a
    static count without exit rule or training bounds.
    ``ValueError`` naming the conflict."""
    own_slots = depth_slots is not None and not shares_depths
    spec = loops.with_default_count(depth_slots if own_slots else cfg.max_loop_iters)
    if spec.exit == ExitRule.ACT and cfg.act == ACTMode.OFF:
        raise ValueError("exit='act' needs ACT halting; MythosConfig.act is 'off'")
    if traced and (not spec.static or spec.exit is not None or spec.trains):
        raise ValueError(f"trace needs a static loop count (a Python int) without exit rule or "
                         f"training bounds, got {spec!r}")
    if cached and (not spec.static or spec.trains):
        raise ValueError(f"a cached forward (prefill, decode, generate) needs loops as a Python "
                         f"int count, with an exit rule if any, nothing of training "
                         f"(backprop_depth, max_loops); got {spec!r}")
    if own_slots and spec.count != depth_slots:
        raise ValueError(f"loops must equal the {depth_slots} depth slots this cache holds (a "
                         f"depth the prompt never filled would be attended as zeros; "
                         f"init_cache(..., shares_depths=True) reuses slots), got {spec.count}")
    return spec


def run_loops(block: RecurrentBlock, e: jax.Array, ctx: LoopContext, spec: LoopSpec,
              decode: Callable[[jax.Array], jax.Array], cache: dict | None = None,
              index=None, trace: TracePoints | None = None) -> LoopResult:
    """Run the recurrence on the prelude output e (B, T, D) as ``spec`` says (resolved and
    checked by :func:`resolve_spec`). ``decode(h)``: next-token log-probabilities of a
    loop output, read by the "kl" exit rules. ``cache``/``index``: the recurrent block's
    per-depth KV cache and each sequence's write slot (B,) (None: an empty cache).
    ``trace``: also return every iteration's ``LoopRecord`` at those points."""
    if trace is not None:
        return run_static(block, e, ctx, spec, trace=trace)
    if spec.trains:
        return run_training(block, e, ctx, spec)
    if spec.static and spec.exit is None:
        return run_static(block, e, ctx, spec, cache, index)
    return run_dynamic(block, e, ctx, spec, decode, cache, index)
