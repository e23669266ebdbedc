"""Mixture-of-Experts FFN of the recurrent block: top-K routed SwiGLU experts + shared experts.

Routing (OpenMythos ``MoEFFN``): ``scores = softmax(router(x))`` over all experts; the top-K
experts are chosen on ``router(x) + router_bias`` (the bias steers selection only); the K
chosen scores are renormalised to sum to 1. Shared experts see every token.

Dispatch (``cfg.moe_impl``), both vectorised with static shapes and no host sync:
  "dense"  every expert on every token, combined with one-hot weights: the reference.
  "sorted" (token, slot) pairs sorted by expert and run as grouped matmuls
           (``lax.ragged_dot``): dropless, K/E of the routed FLOPs of "dense".
"""

from __future__ import annotations

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
        dispatch = _dense_dispatch if self.impl == "dense" else _sorted_dispatch
        kernels = tuple(p[...].astype(self.dtype) for p in (self.gate, self.up, self.down))
        out = dispatch(flat.astype(self.dtype), expert_ids, weights, *kernels).astype(x.dtype)
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


def _sorted_dispatch(x, expert_ids, weights, gate, up, down):
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
