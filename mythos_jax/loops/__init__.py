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
           "LoopSpec", "TracePoints", "per_sequence", "require_traceable", "run_loops"]


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


def run_loops(block: RecurrentBlock, e: jax.Array, ctx: LoopContext, spec: LoopSpec,
              decode: Callable[[jax.Array], jax.Array], cache: dict | None = None,
              index=None, trace: TracePoints | None = None) -> LoopResult:
    """Run the recurrence on the prelude output e (B, T, D) as ``spec`` says (its count
    resolved, see ``OpenMythos.__call__``). ``decode(h)``: next-token log-probabilities of a
    loop output, read by the "kl" exit rules. ``cache``/``index``: the recurrent block's
    per-depth KV cache and its write slot (prefill / decode). ``trace``: also return every
    iteration's ``LoopRecord`` at those points (a static count, no exit rule, no cache)."""
    if spec.exit == ExitRule.ACT and block.act_mode == ACTMode.OFF:
        raise ValueError("exit='act' needs ACT halting; MythosConfig.act is 'off'")
    if trace is not None:
        require_traceable(spec, cache)
        return run_static(block, e, ctx, spec, trace=trace)
    if spec.trains:
        if cache is not None:
            raise ValueError("backprop_depth / max_loops are for training; a cached forward "
                             "takes a static loop count or an exit rule")
        return run_training(block, e, ctx, spec)
    if spec.static and spec.exit is None:
        return run_static(block, e, ctx, spec, cache, index)
    return run_dynamic(block, e, ctx, spec, decode, cache, index)


def require_traceable(spec: LoopSpec, cache: dict | None = None) -> None:
    """A traced loop needs a static count, no exit rule, no training bounds and no cache."""
    if not spec.static or spec.exit is not None or spec.trains or cache is not None:
        raise ValueError(f"trace needs a static loop count (a Python int) without exit rule, "
                         f"training bounds or cache, got {spec!r}"
                         f"{' and a cache' if cache is not None else ''}")
