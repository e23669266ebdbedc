"""Router statistics for load balancing (nothing here changes the layer's output).

Every MoE call returns ``RouterStats`` per sequence b (T tokens, K slots, E experts):
  load[b, e]  (token, slot) assignments to expert e (sums to T * K)
  aux_loss[b] = E * sum_e f_e * P_e, with f_e = load[b, e] / (T * K) the share of the
              sequence's assignments and P_e its mean router probability softmax(router(x))
              (DeepSeek-V3's sequence-wise balance loss without its weight): 1 at a uniform
              load, up to E / K when every token picks the same K experts and they hold all
              the probability; differentiable through P only (f comes from top-K)
  z_loss[b]   = mean over tokens of logsumexp(router_logits)^2 (ST-MoE router z-loss)
  dropped     rows the dispatcher dropped in the whole call (0 when dropless)
The recurrence sums them over the loop iterations into ``MoEStats``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


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
