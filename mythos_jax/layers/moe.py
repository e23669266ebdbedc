"""Mixture-of-Experts FFN of the recurrent block: top-K routed SwiGLU experts + shared experts.

Routing (OpenMythos ``MoEFFN``): ``scores = softmax(router(x))`` over all experts; the top-K
experts are chosen on ``router(x) + router_bias`` (the bias steers selection only); the K
chosen scores are renormalised to sum to 1. Shared experts see every token.

Dispatch (``cfg.moe_impl``), all vectorised with static shapes, no host sync, dropless:
  "dense"  every expert on every token, combined with one-hot weights: the reference.
  "grouped" (token, slot) rows sorted by expert into fixed-size blocks (one expert per
           block, each expert padded to a whole block) and run as one batched matmul: compute
           is bounded by N*K + E*(block-1) rows whatever the routing.
  "ragged" pairs sorted by expert and run as grouped matmuls (``lax.ragged_dot``); the form
           for GPU/TPU grouped-matmul kernels (XLA:CPU runs it about as slowly as "dense").
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mythos_jax.config import MythosConfig
from mythos_jax.layers.common import compute_dtype, linear, normal_init
from mythos_jax.layers.ffn import SwiGLU


class RouterBias(nnx.Variable):
    """Selection-only router bias (E,): a buffer, not a Param, so optimizers leave it alone."""


def route(router_logits: jax.Array, router_bias: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """router_logits (N, E) fp32 -> expert ids (N, K) int32 and renormalised weights (N, K)."""
    scores = jax.nn.softmax(router_logits, axis=-1)
    _, expert_ids = jax.lax.top_k(router_logits + router_bias, k)
    weights = jnp.take_along_axis(scores, expert_ids, axis=-1)
    return expert_ids, weights / jnp.sum(weights, axis=-1, keepdims=True)


class MoE(nnx.Module):
    """Routed + shared experts. Routed kernels are stacked: gate/up (E, D, F), down (E, F, D)."""

    def __init__(self, cfg: MythosConfig, *, rngs: nnx.Rngs):
        self.dtype = compute_dtype(cfg)
        self.top_k, self.impl = cfg.n_experts_per_tok, cfg.moe_impl
        E, D, F = cfg.n_experts, cfg.dim, cfg.expert_dim
        self.router = linear(D, E, ("embed", "expert"), rngs=rngs)       # fp32 routing always
        self.router_bias = RouterBias(jnp.zeros((E,), jnp.float32), logical_axes=("expert",))
        self.gate = nnx.Param(normal_init(rngs.params(), (E, D, F)),
                              logical_axes=("expert", "embed", "mlp"))
        self.up = nnx.Param(normal_init(rngs.params(), (E, D, F)),
                            logical_axes=("expert", "embed", "mlp"))
        self.down = nnx.Param(normal_init(rngs.params(), (E, F, D)),
                              logical_axes=("expert", "mlp", "embed"))
        self.shared_experts = nnx.List(
            [SwiGLU(D, cfg.shared_hidden, rngs=rngs, dtype=self.dtype)
             for _ in range(cfg.n_shared_experts)])

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, T, D) -> (B, T, D)."""
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        expert_ids, weights = route(self.router(flat.astype(jnp.float32)), self.router_bias[...],
                                    self.top_k)
        kernels = tuple(p[...].astype(self.dtype) for p in (self.gate, self.up, self.down))
        args = (flat.astype(self.dtype), expert_ids, weights, *kernels)
        if self.impl == "dense":
            out = _dense_dispatch(*args)
        elif self.impl == "ragged":
            out = _ragged_dispatch(*args)
        else:
            out = _grouped_dispatch(*args)
        out = out.astype(x.dtype)
        for shared in self.shared_experts:
            out = out + shared(flat).astype(x.dtype)
        return out.reshape(B, T, D)


def _dense_dispatch(x, expert_ids, weights, gate, up, down):
    """Every expert on every token: x (N, D) -> (N, D). Reference; O(E) compute."""
    hidden = jax.nn.silu(jnp.einsum("nd,edf->enf", x, gate)) * jnp.einsum("nd,edf->enf", x, up)
    expert_out = jnp.einsum("enf,efd->end", hidden, down)                 # (E, N, D)
    combine = jnp.sum(jax.nn.one_hot(expert_ids, gate.shape[0], dtype=weights.dtype)
                      * weights[..., None], axis=1)                       # (N, E)
    return jnp.einsum("ne,end->nd", combine.astype(expert_out.dtype), expert_out)


def _grouped_dispatch(x, expert_ids, weights, gate, up, down):
    """Rows sorted by expert into fixed-size blocks, one expert per block: x (N, D) -> (N, D).

    Each expert's rows are padded up to a multiple of ``block``, so at most
    ``N*K + E*(block-1)`` rows are computed whatever the routing (balanced or all tokens on
    one expert); the static block count bounds that. Every block gathers its expert's
    kernels and the blocks run as one batched matmul.
    """
    n_tokens, k = expert_ids.shape
    n_experts, n_rows = gate.shape[0], expert_ids.size
    rows_per_expert = n_rows / (2 * n_experts)   # half the mean load: bounded padding
    block = 1 if rows_per_expert <= 1 else min(256, 8 * math.ceil(rows_per_expert / 8))
    n_blocks = math.ceil((n_rows + n_experts * (block - 1)) / block)

    flat_ids = expert_ids.reshape(-1)                                     # (N*K,)
    order = jnp.argsort(flat_ids, stable=True)                            # rows by expert
    sorted_ids = flat_ids[order]
    counts = jnp.bincount(flat_ids, length=n_experts)
    padded_counts = (counts + block - 1) // block * block
    padded_end = jnp.cumsum(padded_counts)
    rank_in_expert = jnp.arange(n_rows) - (jnp.cumsum(counts) - counts)[sorted_ids]
    dest = (padded_end - padded_counts)[sorted_ids] + rank_in_expert      # row -> buffer slot
    buffer = jnp.zeros((n_blocks * block, x.shape[1]), x.dtype)
    buffer = buffer.at[dest].set(x[order // k], unique_indices=True)
    block_expert = jnp.minimum(
        jnp.searchsorted(padded_end, jnp.arange(n_blocks) * block, side="right"), n_experts - 1)

    blocks = buffer.reshape(n_blocks, block, -1)
    hidden = (jax.nn.silu(jnp.einsum("nbd,ndf->nbf", blocks, gate[block_expert]))
              * jnp.einsum("nbd,ndf->nbf", blocks, up[block_expert]))
    block_out = jnp.einsum("nbf,nfd->nbd", hidden, down[block_expert])
    row_out = block_out.reshape(n_blocks * block, -1)[dest]
    row_out = row_out * weights.reshape(-1)[order][:, None].astype(row_out.dtype)
    return jnp.zeros((n_tokens, x.shape[1]), row_out.dtype).at[order // k].add(row_out)


def _ragged_dispatch(x, expert_ids, weights, gate, up, down):
    """(token, slot) pairs grouped by expert, grouped matmuls: x (N, D) -> (N, D). Dropless."""
    n_tokens, k = expert_ids.shape
    flat_ids = expert_ids.reshape(-1)                                     # (N*K,)
    order = jnp.argsort(flat_ids, stable=True)
    rows = x[order // k]                                                  # (N*K, D) sorted
    group_sizes = jnp.bincount(flat_ids, length=gate.shape[0]).astype(jnp.int32)
    hidden = (jax.nn.silu(jax.lax.ragged_dot(rows, gate, group_sizes))
              * jax.lax.ragged_dot(rows, up, group_sizes))
    sorted_out = jax.lax.ragged_dot(hidden, down, group_sizes)            # (N*K, D)
    slot_out = jnp.zeros_like(sorted_out).at[order].set(sorted_out).reshape(n_tokens, k, -1)
    return jnp.einsum("nkd,nk->nd", slot_out, weights.astype(slot_out.dtype))
