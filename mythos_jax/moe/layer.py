"""Mixture-of-Experts FFN of the recurrent block: top-K routed SwiGLU experts (``router``,
``dispatch``) + shared experts that see every token; each call also returns its
``RouterStats`` (``stats``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mythos_jax.config import MythosConfig
from mythos_jax.layers.common import compute_dtype, linear, normal_init
from mythos_jax.layers.ffn import SwiGLU
from mythos_jax.moe.dispatch import dispatch
from mythos_jax.moe.router import RouterBias, route
from mythos_jax.moe.stats import RouterStats, router_stats


class MoE(nnx.Module):
    """Routed + shared experts. Routed kernels are stacked: gate/up (E, D, F), down (E, F, D)."""

    def __init__(self, cfg: MythosConfig, *, rngs: nnx.Rngs):
        self.dtype = compute_dtype(cfg)
        self.top_k, self.impl = cfg.n_experts_per_tok, cfg.moe_impl
        self.capacity_factor = cfg.capacity_factor
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

    def __call__(self, x: jax.Array) -> tuple[jax.Array, RouterStats]:
        """x (B, T, D) -> ((B, T, D), RouterStats of this call)."""
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        router_logits = self.router(flat.astype(jnp.float32))                     # (N, E)
        expert_ids, weights = route(router_logits, self.router_bias[...], self.top_k)
        kernels = tuple(p[...].astype(self.dtype) for p in (self.gate, self.up, self.down))
        out, dropped = dispatch(self.impl, flat.astype(self.dtype), expert_ids, weights,
                                 *kernels, capacity_factor=self.capacity_factor)
        out = out.astype(x.dtype)
        for shared in self.shared_experts:
            out = out + shared(flat).astype(x.dtype)
        stats = router_stats(router_logits.reshape(B, T, -1),
                             expert_ids.reshape(B, T, self.top_k), dropped)
        return out.reshape(B, T, D), stats
