"""Mixture-of-Experts FFN of the recurrent block: top-K routed SwiGLU experts + shared experts.

Routing (OpenMythos ``MoEFFN``): ``scores = softmax(router(x))`` over all experts; the top-K
experts are chosen on ``router(x) + router_bias`` (the bias steers selection only); the K
chosen scores are renormalised to sum to 1. Shared experts see every token.

Dispatch strategies (``cfg.moe_impl``) live in ``layers/moe_dispatch.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mythos_jax.config import MythosConfig
from mythos_jax.layers.common import compute_dtype, linear, normal_init
from mythos_jax.layers.ffn import SwiGLU
from mythos_jax.layers.moe_dispatch import dispatch


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
        out, _dropped = dispatch(self.impl, flat.astype(self.dtype), expert_ids, weights,
                                 *kernels)
        out = out.astype(x.dtype)
        for shared in self.shared_experts:
            out = out + shared(flat).astype(x.dtype)
        return out.reshape(B, T, D)
