"""Top-K routing (OpenMythos ``MoEFFN``) and its selection-only bias.

``scores = softmax(router(x))`` over all experts; the top-K experts are chosen on
``router(x) + router_bias`` (the bias steers selection only); the K chosen scores are
renormalised to sum to 1. :func:`update_router_biases` is the aux-loss-free balancing step
(DeepSeek-V3), applied outside the gradient to every ``RouterBias``, a buffer that optimizers
never see (it is not a Param).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RouterBias(nnx.Variable):
    """Selection-only router bias (E,): a buffer, not a Param, so optimizers leave it alone."""


def route(router_logits: jax.Array, router_bias: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """router_logits (N, E) fp32 -> expert ids (N, K) int32 and renormalised weights (N, K)."""
    scores = jax.nn.softmax(router_logits, axis=-1)
    _, expert_ids = jax.lax.top_k(router_logits + router_bias, k)
    weights = jnp.take_along_axis(scores, expert_ids, axis=-1)
    return expert_ids, weights / jnp.sum(weights, axis=-1, keepdims=True)


def update_router_biases(target, load: jax.Array, rate: float):
    """``bias + rate * sign(mean(load) - load)`` on every ``RouterBias`` of ``target`` (an
    nnx.Module, updated in place, or an nnx.State, returned anew); load (E,). Under-loaded
    experts become more likely to be picked, over-loaded ones less. Returns the updated
    target. The model has one MoE layer (the looped block): ``load`` is ``LoopInfo.moe.load``."""
    if isinstance(target, nnx.Module):
        nnx.update(target, update_router_biases(nnx.state(target, RouterBias), load, rate))
        return target

    def update(leaf):
        if not isinstance(leaf, RouterBias):
            return leaf
        bias = leaf[...]
        return leaf.replace((bias + rate * jnp.sign(jnp.mean(load) - load)).astype(bias.dtype))

    return jax.tree.map(update, target, is_leaf=lambda x: isinstance(x, nnx.Variable))
