"""Mixture-of-Experts FFN of the recurrent block: top-K routed SwiGLU experts + shared experts.

Routing (OpenMythos ``MoEFFN``): ``scores = softmax(router(x))`` over all experts; the top-K
experts are chosen on ``router(x) + router_bias`` (the bias steers selection only); the K
chosen scores are renormalised to sum to 1. Shared experts see every token.

Dispatch strategies (``cfg.moe_impl``) live in ``layers/moe_dispatch.py``.

Load balancing (nothing here changes the layer's output):
  * every call returns ``RouterStats`` per sequence b (T tokens, K slots, E experts):
      load[b, e]  (token, slot) assignments to expert e (sums to T * K)
      aux_loss[b] = E * sum_e f_e * P_e, with f_e = load[b, e] / (T * K) the share of the
                  sequence's assignments and P_e its mean router probability softmax(router(x))
                  (DeepSeek-V3's sequence-wise balance loss without its weight): 1 at a uniform
                  load, up to E / K when every token picks the same K experts and they hold
                  all the probability; differentiable through P only (f comes from top-K)
      z_loss[b]   = mean over tokens of logsumexp(router_logits)^2 (ST-MoE router z-loss)
      dropped     rows the dispatcher dropped in the whole call (0 when dropless)
  * ``update_router_bias`` is the aux-loss-free update (DeepSeek-V3), applied outside the
    gradient to the ``RouterBias`` buffer, which optimizers never see (it is not a Param).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mythos_jax.config import MythosConfig
from mythos_jax.layers.common import compute_dtype, linear, normal_init
from mythos_jax.layers.ffn import SwiGLU
from mythos_jax.layers.moe_dispatch import dispatch


class RouterBias(nnx.Variable):
    """Selection-only router bias (E,): a buffer, not a Param, so optimizers leave it alone."""


class RouterStats(NamedTuple):
    """Router statistics of one MoE call, per sequence (see the module docstring)."""
    load: jax.Array       # (B, E) fp32 (token, slot) assignments per expert
    aux_loss: jax.Array   # (B,) fp32 sequence-level balance loss
    z_loss: jax.Array     # (B,) fp32 router z-loss
    dropped: jax.Array    # () fp32 rows dropped by the dispatcher, whole call


class MoEStats(NamedTuple):
    """Router statistics of a forward pass, over every loop iteration run (``LoopInfo.moe``).
    Only sequences still looping count: a sequence stopped early adds nothing after it stops,
    except to ``dropped`` (its frozen rows still pass the dispatcher and take capacity)."""
    load: jax.Array           # (E,) fp32 assignments per expert, all iterations
    load_per_loop: jax.Array  # (L, E) fp32 the same per loop iteration; rows not run are 0
    aux_loss: jax.Array       # () fp32 mean of aux_loss over the (sequence, iteration) pairs run
    z_loss: jax.Array         # () fp32 mean of z_loss over the same pairs
    dropped: jax.Array        # () fp32 rows dropped, all iterations


def route(router_logits: jax.Array, router_bias: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """router_logits (N, E) fp32 -> expert ids (N, K) int32 and renormalised weights (N, K)."""
    scores = jax.nn.softmax(router_logits, axis=-1)
    _, expert_ids = jax.lax.top_k(router_logits + router_bias, k)
    weights = jnp.take_along_axis(scores, expert_ids, axis=-1)
    return expert_ids, weights / jnp.sum(weights, axis=-1, keepdims=True)


def router_stats(router_logits: jax.Array, expert_ids: jax.Array, dropped) -> RouterStats:
    """router_logits (B, T, E) fp32, expert_ids (B, T, K), dropped () -> RouterStats."""
    n_experts = router_logits.shape[-1]
    _, T, K = expert_ids.shape
    load = jnp.sum(jax.nn.one_hot(expert_ids, n_experts, dtype=jnp.float32), axis=(1, 2))
    mean_prob = jnp.mean(jax.nn.softmax(router_logits, axis=-1), axis=1)        # (B, E)
    aux_loss = n_experts * jnp.sum(load / (T * K) * mean_prob, axis=-1)
    z_loss = jnp.mean(jnp.square(jax.nn.logsumexp(router_logits, axis=-1)), axis=1)
    return RouterStats(load, aux_loss, z_loss, jnp.asarray(dropped, jnp.float32))


def load_ratio(load: jax.Array) -> jax.Array:
    """max / mean of a per-expert load (E,): 1 when perfectly balanced, E when collapsed."""
    return jnp.max(load) / jnp.maximum(jnp.mean(load), 1e-9)


def update_router_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """Aux-loss-free balancing: ``bias + rate * sign(mean(load) - load)``; bias, load (E,).
    Under-loaded experts become more likely to be picked, over-loaded ones less."""
    return (bias + rate * jnp.sign(jnp.mean(load) - load)).astype(bias.dtype)


def update_router_biases(target, load: jax.Array, rate: float):
    """Apply :func:`update_router_bias` to every ``RouterBias`` of ``target``: an nnx.Module
    (updated in place) or an nnx.State (a new State). Returns the updated target. The model
    has one MoE layer (the looped block), so ``load`` is ``LoopInfo.moe.load``."""
    if isinstance(target, nnx.Module):
        nnx.update(target, update_router_biases(nnx.state(target, RouterBias), load, rate))
        return target

    def update(leaf):
        if isinstance(leaf, RouterBias):
            return leaf.replace(update_router_bias(leaf[...], load, rate))
        return leaf

    return jax.tree.map(update, target, is_leaf=lambda x: isinstance(x, nnx.Variable))


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
