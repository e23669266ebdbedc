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
    """logits (B, V) fp32 -> token ids (B,) int32. ``temperature == 0``: argmax (greedy)."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop_sorted = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs >= top_p
        drop = jnp.zeros_like(drop_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
