"""The looped part of OpenMythos: one shared block applied T times with stable injection.

Per iteration t (OpenMythos ``RecurrentBlock.forward``, exact order):
    h_loop = h + loop_embedding(t)                       first dim // 8 channels only
    u      = Block(RMSNorm(h_loop + e))                  attention + MoE, with residual
    u      = u + LoRA_t(u)                               depth-wise LoRA, t clamped
    h      = A * h + B * e + u                           A = exp(-exp(log_dt + log_A))
    p      = sigmoid(halt(h))                            ACT halting probability (B, T)
    h_out += w_t * h                                     OpenMythos's ACT weights (below)
The loop is a ``lax.scan`` whose body closes over the block: its parameters are shared by every
iteration (never copied), and memory does not grow with T in inference. Under differentiation
each iteration is rematerialised per ``cfg.loop_remat`` (see ``REMAT_POLICIES``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mythos_jax.config import MythosConfig
from mythos_jax.layers.block import TransformerBlock
from mythos_jax.layers.common import compute_dtype, linear, normal_init
from mythos_jax.layers.norm import RMSNorm

LOOP_EMBED_THETA = 10000.0  # hard-coded in OpenMythos

# What the backward pass keeps from each loop iteration (``MythosConfig.loop_remat``).
REMAT_POLICIES = {
    "none": None,                                           # keep every intermediate
    "dots": jax.checkpoint_policies.dots_saveable,          # keep matmul outputs only
    "full": jax.checkpoint_policies.nothing_saveable,       # keep only the loop carry
}


def loop_index_embedding(h: jax.Array, t: jax.Array, loop_dim: int) -> jax.Array:
    """Add ``[sin(t f), cos(t f)]`` to channels [0, loop_dim) of h (B, T, D); fp32 angles."""
    freqs = 1.0 / (LOOP_EMBED_THETA ** (jnp.arange(0, loop_dim, 2, dtype=jnp.float32) / loop_dim))
    angles = jnp.asarray(t, jnp.float32) * freqs
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)])[:loop_dim]
    return h.at[..., :loop_dim].add(emb.astype(h.dtype))


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
        """x (B, T, D), t int scalar -> (B, T, D)."""
        table = self.scale[...]
        scale = table[jnp.minimum(t, table.shape[0] - 1)]
        down = self.down(x) * scale.astype(x.dtype)
        return down @ self.B[...].astype(down.dtype)


class LTIInjection(nnx.Module):
    """``h_new = A * h + B * e + u`` with diagonal ``A = exp(-exp(clip(log_dt + log_A, -20, 20)))``."""

    def __init__(self, dim: int):
        self.log_A = nnx.Param(jnp.zeros((dim,), jnp.float32), logical_axes=("embed",))
        self.log_dt = nnx.Param(jnp.zeros((1,), jnp.float32), logical_axes=(None,))
        self.B = nnx.Param(jnp.full((dim,), 0.1, jnp.float32), logical_axes=("embed",))

    def get_A(self) -> jax.Array:
        """(D,) decay per channel, in [0, 1] (exactly 0 or 1 at the clip ends in fp32)."""
        return jnp.exp(-jnp.exp(jnp.clip(self.log_dt[...] + self.log_A[...], -20.0, 20.0)))

    def __call__(self, h: jax.Array, e: jax.Array, u: jax.Array) -> jax.Array:
        return self.get_A() * h + self.B[...] * e + u


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


class LoopState(NamedTuple):
    """Carry of the recurrence: hidden state, ACT output and ACT bookkeeping."""
    h: jax.Array            # (B, T, D) fp32
    h_out: jax.Array        # (B, T, D) fp32, ACT-weighted sum of the h's
    cumulative_p: jax.Array  # (B, T) fp32
    halted: jax.Array       # (B, T) bool


def act_accumulate(state: LoopState, h: jax.Array, p: jax.Array, threshold: float) -> LoopState:
    """OpenMythos's ACT update, bit for bit: a position that crosses ``threshold`` at this step
    gets weight ``1 - cum`` and stops; one that never crosses gets ``p_t`` at every step (no
    remainder flush). Halted positions keep ``h_out`` unchanged (written with ``where`` so a
    non-finite h at a halted position cannot leak in as 0 * inf)."""
    running = ~state.halted
    remainder = jnp.maximum(1.0 - state.cumulative_p, 0.0)
    weight = jnp.where(state.cumulative_p + p >= threshold, remainder, p)
    h_out = jnp.where(running[..., None], state.h_out + weight[..., None] * h, state.h_out)
    cumulative_p = state.cumulative_p + p * running.astype(p.dtype)
    return LoopState(h, h_out, cumulative_p, state.halted | (cumulative_p >= threshold))


class RecurrentBlock(nnx.Module):
    """The shared block, looped: (h, e) -> ACT-weighted output (B, T, D)."""

    def __init__(self, cfg: MythosConfig, *, rngs: nnx.Rngs):
        self.loop_dim, self.act_threshold = cfg.loop_dim, cfg.act_threshold
        self.remat_policy = cfg.loop_remat
        self.block = TransformerBlock(cfg, use_moe=True, rngs=rngs)
        self.injection = LTIInjection(cfg.dim)
        self.act = ACTHalting(cfg.dim, rngs=rngs)
        self.lora = DepthLoRA(cfg, rngs=rngs)
        self.norm = RMSNorm(cfg.dim)

    def step(self, state: LoopState, e: jax.Array, t: jax.Array, rope, mask,
             key: jax.Array | None) -> LoopState:
        """One loop iteration t (int32 scalar) -> the next state."""
        h_loop = loop_index_embedding(state.h, t, self.loop_dim)
        u = self.block(self.norm(h_loop + e), rope, mask, key)
        u = u + self.lora(u, t).astype(u.dtype)
        h = self.injection(state.h, e, u)
        return act_accumulate(state, h, self.act(h), self.act_threshold)

    def __call__(self, e: jax.Array, rope, mask, n_loops: int,
                 key: jax.Array | None = None) -> jax.Array:
        """e (B, T, D) prelude output (also h_0) -> (B, T, D) after ``n_loops`` iterations."""
        B, T, _ = e.shape
        init = LoopState(e, jnp.zeros_like(e), jnp.zeros((B, T), jnp.float32),
                         jnp.zeros((B, T), bool))
        loop_ids = jnp.arange(n_loops, dtype=jnp.int32)
        keys = None if key is None else jax.random.split(key, n_loops)

        def body(state, xs):
            t, step_key = xs
            return self.step(state, e, t, rope, mask, step_key), None

        if self.remat_policy != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat_policy])
        final, _ = jax.lax.scan(body, init, (loop_ids, keys))
        return final.h_out
