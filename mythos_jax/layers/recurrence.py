"""The looped part of OpenMythos: one shared block applied T times with stable injection.

Per iteration t (OpenMythos ``RecurrentBlock.forward``, exact order):
    h_loop = h + loop_embedding(t)                       first dim // 8 channels only
    u      = Block(RMSNorm(h_loop + e))                  attention + MoE, with residual
    u      = u + LoRA_t(u)                               depth-wise LoRA, t clamped
    h      = A * h + B * e + u                           A = exp(-exp(log_dt + log_A))
    p      = sigmoid(halt(h))                            ACT halting probability (B, T)
    h_out += w_t * h                                     OpenMythos's ACT weights (below)
The loop itself (scan, while loop, truncated backprop) is in ``mythos_jax/loops.py``; its bodies
close over this block, so its parameters are shared by every iteration, never copied. The loop
carry also sums the MoE's router statistics over the iterations (``MoEAccum``).
``traced_step`` is ``step`` plus a ``LoopRecord`` of what the iteration did (a traced forward).
``cfg.injection="parcae"`` replaces the injection by Parcae's (``ParcaeInjection``), "additive" by
``h + e + u`` (``AdditiveInjection``), "free" by ``A * h + e @ B.T + u`` with A and B learned and
unconstrained (``FreeInjection``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mythos_jax.config import MythosConfig
from mythos_jax.layers.block import TransformerBlock
from mythos_jax.layers.common import compute_dtype, linear, normal_init
from mythos_jax.layers.norm import RMSNorm
from mythos_jax.modes import ACTMode, Injection
from mythos_jax.moe.router import route
from mythos_jax.moe.stats import MoEStats, RouterStats

LOOP_EMBED_THETA = 10000.0  # hard-coded in OpenMythos


def loop_index_embedding(h: jax.Array, t: jax.Array, loop_dim: int,
                         scale: float = 1.0) -> jax.Array:
    """Add ``scale * [sin(t f), cos(t f)]`` to channels [0, loop_dim) of h (B, T, D); fp32
    angles. ``t`` is the loop index, a scalar or one per sequence (B,)."""
    freqs = 1.0 / (LOOP_EMBED_THETA ** (jnp.arange(0, loop_dim, 2, dtype=jnp.float32) / loop_dim))
    angles = jnp.asarray(t, jnp.float32)[..., None] * freqs                # (B?, loop_dim/2)
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)[..., :loop_dim]
    if scale != 1.0:
        emb = emb * scale
    return h.at[..., :loop_dim].add(emb[..., None, :].astype(h.dtype))


class DepthLoRA(nnx.Module):
    """``delta(x, t) = (down(x) * scale[min(t, max_loop_iters - 1)]) @ B``; B is (rank, D)."""

    def __init__(self, cfg: MythosConfig, *, rngs: nnx.Rngs):
        self.down = linear(cfg.dim, cfg.lora_rank, ("embed", "lora"), rngs=rngs,
                           dtype=compute_dtype(cfg))
        self.B = nnx.Param(normal_init(rngs.params(), (cfg.lora_rank, cfg.dim)),
                           logical_axes=("lora", "embed"))
        self.scale = nnx.Param(normal_init(rngs.params(), (cfg.max_loop_iters, cfg.lora_rank)),
                               logical_axes=("loop", "lora"))

    def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
        """x (B, T, D), t int scalar or (B,) -> (B, T, D)."""
        table = self.scale[...]
        scale = table[jnp.minimum(t, table.shape[0] - 1)]                  # (B?, rank)
        down = self.down(x) * scale[..., None, :].astype(x.dtype)
        return down @ self.B[...].astype(down.dtype)


def strictly_inside_unit(a: jax.Array) -> jax.Array:
    """Clip a decay into the open interval (0, 1) in fp32: exp(-exp(x)) rounds to exactly 1.0
    for x <~ -17 and to 0.0 for x >~ 4.5; only those extremes move (to 1 - 2^-24 / tiny)."""
    a = a.astype(jnp.float32)
    return jnp.clip(a, jnp.finfo(jnp.float32).tiny, 1.0 - 2.0 ** -24)


class LTIInjection(nnx.Module):
    """OpenMythos: ``h_new = A * h + B * e + u``, ``A = exp(-exp(clip(log_dt + log_A, -20, 20)))``
    per channel, B a vector (init 0.1), u the block output (its residual included)."""

    def __init__(self, dim: int):
        self.log_A = nnx.Param(jnp.zeros((dim,), jnp.float32), logical_axes=("embed",))
        self.log_dt = nnx.Param(jnp.zeros((1,), jnp.float32), logical_axes=(None,))
        self.B = nnx.Param(jnp.full((dim,), 0.1, jnp.float32), logical_axes=("embed",))

    def get_A(self) -> jax.Array:
        """(D,) decay per channel, strictly inside (0, 1)."""
        log_decay = jnp.clip(self.log_dt[...] + self.log_A[...], -20.0, 20.0)
        return strictly_inside_unit(jnp.exp(-jnp.exp(log_decay)))

    def __call__(self, h: jax.Array, e: jax.Array, u: jax.Array) -> jax.Array:
        return self.get_A() * h + self.B[...] * e + u


class AdditiveInjection(nnx.Module):
    """``h_new = h + e + u``: no decay and no input gain (A = 1, B = 1), so the state is not
    bounded; the unstable baseline the LTI and Parcae forms are measured against."""

    def __init__(self, dim: int):
        self.dim = dim

    def get_A(self) -> jax.Array:
        """(D,) the implicit decay: 1 on every channel (spectral radius 1)."""
        return jnp.ones((self.dim,), jnp.float32)

    def __call__(self, h: jax.Array, e: jax.Array, u: jax.Array) -> jax.Array:
        return h + e + u


class FreeInjection(nnx.Module):
    """``h_new = A * h + e @ B.T + u`` with A (D,) and B (D, D) learned and unconstrained:
    Parcae's unstable baseline, never for real runs. A starts at 1 (no decay) and nothing keeps
    it inside (-1, 1), so rho(A) = max |A_i| may cross 1 and the state then grows like
    rho^T; B starts at ``0.1 * I``, OpenMythos's input gain, so that at init the form is the
    LTI injection with its decay set to 1 and its constraint removed."""

    def __init__(self, dim: int):
        self.A = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("embed",))
        self.B = nnx.Param(0.1 * jnp.eye(dim, dtype=jnp.float32),
                           logical_axes=("embed", "embed_out"))

    def get_A(self) -> jax.Array:
        """(D,) the decay per channel as learned (any sign, any size), fp32."""
        return self.A[...].astype(jnp.float32)

    def __call__(self, h: jax.Array, e: jax.Array, u: jax.Array) -> jax.Array:
        return self.get_A() * h + e @ self.B[...].T + u


# softplus^-1(-ln(0.447)): Parcae's dt_bias init, giving A = 0.447 on every channel at A_log = 0.
_PARCAE_DT_BIAS = float(np.log(np.expm1(-np.log(0.447))))


class ParcaeInjection(nnx.Module):
    """Parcae: ``u = A * h + dt * (e @ B.T)`` with ``dt = softplus(dt_bias)`` and
    ``A = exp(-dt * exp(A_log))`` per channel, B a full (D, D) matrix initialised to identity.
    The block then adds its residual increments to ``u`` (``h' = Block(u)``)."""

    def __init__(self, dim: int):
        self.A_log = nnx.Param(jnp.zeros((dim,), jnp.float32), logical_axes=("embed",))
        self.dt_bias = nnx.Param(jnp.full((dim,), _PARCAE_DT_BIAS, jnp.float32),
                                 logical_axes=("embed",))
        self.B = nnx.Param(jnp.eye(dim, dtype=jnp.float32), logical_axes=("embed", "embed_out"))

    def get_A(self) -> jax.Array:
        """(D,) decay per channel, strictly inside (0, 1). A_log is capped at 88, where exp
        would overflow (0 * inf would give NaN when softplus(dt_bias) underflows)."""
        dt = jax.nn.softplus(self.dt_bias[...])
        return strictly_inside_unit(jnp.exp(-dt * jnp.exp(jnp.minimum(self.A_log[...], 88.0))))

    def __call__(self, h: jax.Array, e: jax.Array) -> jax.Array:
        dt = jax.nn.softplus(self.dt_bias[...])
        return self.get_A() * h + dt * (e @ self.B[...].T)


INJECTION_CLASSES = {Injection.OPENMYTHOS: LTIInjection, Injection.PARCAE: ParcaeInjection,
                     Injection.ADDITIVE: AdditiveInjection, Injection.FREE: FreeInjection}


class ACTHalting(nnx.Module):
    """Halting probability ``sigmoid(h @ w + b)`` per position; bias init U(+-1/sqrt(D)) (torch)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        bound = dim ** -0.5
        self.halt = linear(dim, 1, ("embed", None), rngs=rngs, use_bias=True,
                           bias_init=_uniform_range(-bound, bound))

    def __call__(self, h: jax.Array) -> jax.Array:
        """h (B, T, D) -> p (B, T) fp32."""
        return jax.nn.sigmoid(self.halt(h.astype(jnp.float32))[..., 0])


def _uniform_range(low: float, high: float):
    """Initialiser U(low, high) (torch's default nn.Linear bias init)."""
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, low, high)
    return init


class MoEAccum(NamedTuple):
    """Router statistics summed over loop iterations (batch totals, part of the loop carry).
    Iteration t adds to row ``min(t, L - 1)`` of ``load_per_loop``."""
    load_per_loop: jax.Array   # (L, E) fp32
    aux_sum: jax.Array         # () fp32 sum of per-sequence aux_loss over iterations
    z_sum: jax.Array           # () fp32 same for z_loss
    sequences: jax.Array       # () fp32 (sequence, iteration) pairs counted
    dropped: jax.Array         # () fp32

    @classmethod
    def zeros(cls, rows: int, n_experts: int) -> "MoEAccum":
        zero = jnp.zeros((), jnp.float32)
        return cls(jnp.zeros((rows, n_experts), jnp.float32), zero, zero, zero, zero)

    def add(self, stats: RouterStats, t: jax.Array, active: jax.Array | None) -> "MoEAccum":
        """Count one iteration at loop index ``t`` (scalar or (B,)) for the sequences where
        ``active`` (B,) is True (None: all); ``dropped`` counts when any sequence is active."""
        active = jnp.ones(stats.aux_loss.shape, bool) if active is None else active
        rows = jnp.broadcast_to(jnp.minimum(t, self.load_per_loop.shape[0] - 1), active.shape)
        load = jnp.where(active[:, None], stats.load, 0.0)
        return MoEAccum(self.load_per_loop.at[rows].add(load),
                        self.aux_sum + jnp.sum(jnp.where(active, stats.aux_loss, 0.0)),
                        self.z_sum + jnp.sum(jnp.where(active, stats.z_loss, 0.0)),
                        self.sequences + jnp.sum(active.astype(jnp.float32)),
                        self.dropped + jnp.where(jnp.any(active), stats.dropped, 0.0))

    def totals(self) -> MoEStats:
        """The forward pass's :class:`MoEStats` (losses averaged over the pairs counted)."""
        pairs = jnp.maximum(self.sequences, 1.0)
        return MoEStats(jnp.sum(self.load_per_loop, axis=0), self.load_per_loop,
                        self.aux_sum / pairs, self.z_sum / pairs, self.dropped)


class LoopState(NamedTuple):
    """Carry of the recurrence: hidden state, ACT output and bookkeeping (per sequence), and
    the router statistics (batch totals; ``RecurrentBlock.start`` creates them)."""
    h: jax.Array               # (B, T, D) fp32
    h_out: jax.Array           # (B, T, D) fp32, ACT-weighted sum of the h's
    cumulative_p: jax.Array    # (B, T) fp32
    halted: jax.Array          # (B, T) bool
    expected_loops: jax.Array  # (B, T) fp32, sum_t (t + 1) * w_t (the ponder cost's core)
    moe: MoEAccum | None = None


def act_accumulate(state: LoopState, h: jax.Array, p: jax.Array, t: jax.Array,
                   threshold: float) -> LoopState:
    """OpenMythos's ACT update, bit for bit: a position that crosses ``threshold`` at this step
    gets weight ``1 - cum`` and stops; one that never crosses gets ``p_t`` at every step (no
    remainder flush). Halted positions keep ``h_out`` unchanged (written with ``where`` so a
    non-finite h at a halted position cannot leak in as 0 * inf)."""
    running = ~state.halted
    weight = act_weight(state.cumulative_p, p, threshold)
    h_out = jnp.where(running[..., None], state.h_out + weight[..., None] * h, state.h_out)
    cumulative_p = state.cumulative_p + p * running.astype(p.dtype)
    loop_number = (jnp.asarray(t, jnp.float32) + 1.0).reshape(-1, 1)     # (B|1, 1)
    expected = state.expected_loops + jnp.where(running, weight * loop_number, 0.0)
    return LoopState(h, h_out, cumulative_p, state.halted | (cumulative_p >= threshold), expected,
                     state.moe)


def act_weight(cumulative_p: jax.Array, p: jax.Array, threshold: float) -> jax.Array:
    """OpenMythos's ACT weight of this step's h (B, T), for a position still running: the
    remainder ``1 - cum`` where ``cum + p`` crosses ``threshold``, else ``p``."""
    remainder = jnp.maximum(1.0 - cumulative_p, 0.0)
    return jnp.where(cumulative_p + p >= threshold, remainder, p)


def relative_change(h: jax.Array, previous: jax.Array) -> jax.Array:
    """``||h - previous|| / ||h||`` per sequence over (T, D): (B, T, D) x 2 -> (B,) fp32."""
    h, previous = h.astype(jnp.float32), previous.astype(jnp.float32)
    change = jnp.sqrt(jnp.sum(jnp.square(h - previous), axis=(1, 2)))
    return change / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(h), axis=(1, 2))), 1e-30)


class TracePoints(NamedTuple):
    """Which positions a trajectory keeps: ``positions`` a tuple of indices into T (negative
    ones count from the end), or None for all."""
    positions: tuple[int, ...] | None = None

    def take(self, x: jax.Array) -> jax.Array:
        """x (B, T, ...) -> (B, P, ...) at the chosen positions."""
        if self.positions is None:
            return x
        return jnp.take(x, jnp.asarray(self.positions, jnp.int32), axis=1)


class LoopRecord(NamedTuple):
    """What one loop iteration did; the static driver stacks them (a leading (n,) axis).
    Per-position fields are at the :class:`TracePoints` P."""
    h: jax.Array               # (B, P, D) fp32 hidden state after the iteration
    halt_p: jax.Array          # (B, P) fp32 halting probability sigmoid(halt(h))
    act_weight: jax.Array      # (B, P) fp32 weight of h in the ACT sum (0 once halted)
    halted: jax.Array          # (B, P) bool halted after this iteration
    expert_ids: jax.Array      # (B, P, K) int32 the router's top-K experts
    expert_weights: jax.Array  # (B, P, K) fp32 their renormalised weights
    rho: jax.Array             # () fp32 spectral radius of the injection's A (max |A_i|)
    delta: jax.Array           # (B,) fp32 ||h_t - h_{t-1}|| / ||h_t|| over every position


class RecurrentBlock(nnx.Module):
    """The shared block and everything that makes one loop iteration (see module docstring).

    The loop itself lives in :mod:`mythos_jax.loops`; this class gives it ``step`` (one
    iteration), ``readout`` (the recurrence's output after some iterations) and
    ``ponder_cost``.
    """

    def __init__(self, cfg: MythosConfig, *, rngs: nnx.Rngs):
        self.loop_dim, self.act_threshold = cfg.loop_dim, cfg.act_threshold
        self.loop_embed_scale = cfg.loop_embed_scale
        self.act_mode, self.injection_type = cfg.act, cfg.injection
        self.remat_policy = cfg.loop_remat
        self.max_loop_iters, self.n_experts = cfg.max_loop_iters, cfg.n_experts
        self.block = TransformerBlock(cfg, use_moe=True, rngs=rngs)
        self.injection = INJECTION_CLASSES[cfg.injection](cfg.dim)
        self.act = ACTHalting(cfg.dim, rngs=rngs)
        self.lora = DepthLoRA(cfg, rngs=rngs)
        self.norm = RMSNorm(cfg.dim)

    def start(self, e: jax.Array, max_loops: int | None = None) -> LoopState:
        """The state before the first loop: h_0 = e (the prelude output), no statistics yet.
        ``load_per_loop`` gets L = max(cfg.max_loop_iters, max_loops) rows (``max_loops``: the
        driver's static bound on the loop count, if any)."""
        B, T, _ = e.shape
        zeros = jnp.zeros((B, T), jnp.float32)
        rows = max(self.max_loop_iters, max_loops or 0)
        return LoopState(e, jnp.zeros_like(e), zeros, jnp.zeros((B, T), bool), zeros,
                         MoEAccum.zeros(rows, self.n_experts))

    def step(self, state: LoopState, e: jax.Array, t: jax.Array, rope, span,
             key: jax.Array | None, cache: dict | None = None, index=None,
             active: jax.Array | None = None, observe=None) -> tuple[LoopState, dict | None]:
        """One loop iteration; ``t`` is the loop index, a scalar or one per sequence (B,).
        ``rope``, ``span`` as in attention; ``cache`` is this depth's attention cache
        (prefill / decode), returned updated. ``active`` (B,):
        the sequences whose router statistics count (None: all); the caller freezes the
        others' per-sequence state. ``observe``: the block's (see ``TransformerBlock``)."""
        if self.injection_type != Injection.PARCAE:   # OpenMythos order (LTI, additive, free)
            h_loop = loop_index_embedding(state.h, t, self.loop_dim, self.loop_embed_scale)
            u, cache, stats = self.block(self.norm(h_loop + e), rope, span, key, cache, index,
                                         observe)
            u = u + self.lora(u, t).astype(u.dtype)
            h = self.injection(state.h, e, u)
        else:
            u = loop_index_embedding(self.injection(state.h, e), t, self.loop_dim,
                                     self.loop_embed_scale)
            h, cache, stats = self.block(u, rope, span, key, cache, index, observe)
            h = h + self.lora(h, t).astype(h.dtype)
        state = state._replace(moe=state.moe.add(stats, t, active))
        return act_accumulate(state, h, self.act(h), t, self.act_threshold), cache

    def traced_step(self, state: LoopState, e: jax.Array, t: jax.Array, rope, span,
                    key: jax.Array | None, points: TracePoints
                    ) -> tuple[LoopState, LoopRecord]:
        """``step`` (no cache) and its :class:`LoopRecord` at ``points``; the router's
        choices are recomputed from the FFN input the block observed (same ops)."""
        ffn_inputs = []
        new, _ = self.step(state, e, t, rope, span, key, observe=ffn_inputs.append)
        moe = self.block.ffn
        B, T, D = ffn_inputs[0].shape
        logits = moe.router(ffn_inputs[0].reshape(B * T, D).astype(jnp.float32))
        expert_ids, weights = route(logits, moe.router_bias[...], moe.top_k)
        p = self.act(new.h)
        weight = jnp.where(state.halted, 0.0, act_weight(state.cumulative_p, p, self.act_threshold))
        record = LoopRecord(points.take(new.h), points.take(p), points.take(weight),
                            points.take(new.halted), points.take(expert_ids.reshape(B, T, -1)),
                            points.take(weights.reshape(B, T, -1)),
                            jnp.max(jnp.abs(self.injection.get_A())),
                            relative_change(new.h, state.h))
        return new, record

    def output(self, state: LoopState) -> jax.Array:
        """(B, T, D) output of the recurrence: ``cfg.act`` = "openmythos" the ACT sum as is;
        "flush" the ACT sum with the unspent mass ``1 - cum`` of never-halted positions put on
        the last h (weights sum to 1); "off" the last h."""
        if self.act_mode == ACTMode.OFF:
            return state.h
        if self.act_mode == ACTMode.FLUSH:
            leftover = jnp.where(state.halted, 0.0, jnp.maximum(1.0 - state.cumulative_p, 0.0))
            return state.h_out + leftover[..., None] * state.h
        return state.h_out

    def ponder_cost(self, state: LoopState, loops_run: jax.Array) -> jax.Array:
        """(B, T) expected loop count under the halting weights; the unspent mass counts at
        the last loop run (``loops_run`` (B,) or scalar). Differentiable through p."""
        spent = jnp.where(state.halted, 1.0, jnp.minimum(state.cumulative_p, 1.0))
        last = jnp.asarray(loops_run, jnp.float32).reshape(-1, 1)
        return state.expected_loops + (1.0 - spent) * last
