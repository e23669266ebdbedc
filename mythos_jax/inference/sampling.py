"""Next-token choice from logits: greedy, temperature, top-k, top-p (nucleus)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """``ValueError`` naming the bad argument."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and not 1 <= top_k:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample_next(logits: jax.Array, key: jax.Array, temperature: float, top_k: int | None,
                top_p: float | None) -> jax.Array:
    """logits (B, V) fp32 -> token ids (B,) int32. ``temperature == 0``: argmax (greedy).

    Sampling works on the candidates only: the ``top_k`` best (``lax.top_k``, no full sort),
    all V sorted when only ``top_p`` is set, or all V unsorted. The nucleus is the smallest
    prefix of the sorted candidates whose mass reaches ``top_p`` (the first always stays),
    and one uniform draw per row picks a candidate by inverse CDF, so the random bits cost
    O(B) instead of a Gumbel draw per vocabulary entry."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    vocab = logits.shape[-1]
    if top_k is not None and top_k < vocab:
        values, ids = jax.lax.top_k(logits, top_k)
    elif top_p is not None and top_p < 1.0:
        ids = jnp.argsort(-logits, axis=-1)
        values = jnp.take_along_axis(logits, ids, axis=-1)
    else:
        values, ids = logits, None
    probs = jax.nn.softmax(values, axis=-1)
    if top_p is not None and top_p < 1.0:
        probs = jnp.where(jnp.cumsum(probs, axis=-1) - probs >= top_p, 0.0, probs)
    choice = inverse_cdf_choice(probs, key)
    if ids is None:
        return choice
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def inverse_cdf_choice(weights: jax.Array, key: jax.Array) -> jax.Array:
    """weights (B, n) >= 0, each row with a positive sum -> (B,) int32 indices drawn with
    probability proportional to the weights: one uniform per row against the running sum."""
    cdf = jnp.cumsum(weights, axis=-1)
    total = cdf[:, -1:]
    u = jax.random.uniform(key, total.shape, weights.dtype) * total
    index = jnp.sum(cdf <= u, axis=-1)
    # u * total may round up to the total: stay on the last entry with positive weight.
    return jnp.minimum(index, jnp.argmax(cdf, axis=-1)).astype(jnp.int32)
