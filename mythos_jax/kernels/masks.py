"""The masks the MLA kernels compute from a few integers, and their dense boolean twins.

Prefill / training (T queries over the same T keys): causal with per-sequence left padding,
``kv_start`` (B,): query i sees keys j with ``min(kv_start, i) <= j <= i`` (a padding row
i < kv_start sees itself only, as ``OpenMythos.forward_cached`` builds it; kv_start = 0 is
plain causal). Decode (one query over S cache slots): keys ``kv_start <= j < kv_end``.

The model hands attention a dense mask; ``causal_starts`` / ``key_ranges`` read the integers
back from it and say whether the dense mask is exactly the one they describe.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_start_mask(kv_start: jax.Array, length: int) -> jax.Array:
    """kv_start (B,) -> bool (B, T, T) = the prefill mask described above."""
    rows = jnp.arange(length)[:, None]
    cols = jnp.arange(length)[None, :]
    return (cols <= rows) & (cols >= jnp.minimum(kv_start[:, None, None], rows))


def key_range_mask(kv_start: jax.Array, kv_end: jax.Array, length: int) -> jax.Array:
    """kv_start, kv_end (B,) -> bool (B, S): keys in [kv_start, kv_end)."""
    cols = jnp.arange(length)[None, :]
    return (cols >= kv_start[:, None]) & (cols < kv_end[:, None])


def causal_starts(mask: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
    """Dense mask (B|1, T, T) -> (kv_start (B,) int32, matches (B,) bool): kv_start is the first
    key the last query sees; ``matches`` says the mask equals ``causal_start_mask(kv_start)``."""
    kv_start = jnp.argmax(mask[:, -1, :], axis=-1).astype(jnp.int32)
    matches = jnp.all(mask == causal_start_mask(kv_start, mask.shape[-1]), axis=(1, 2))
    return (jnp.broadcast_to(kv_start, (batch,)), jnp.broadcast_to(matches, (batch,)))


def key_ranges(mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Dense decode mask (B, 1, S) -> (kv_start, kv_end, matches), each (B,): the first and one
    past the last visible key; ``matches`` says the visible keys are exactly that range."""
    row = mask[:, 0, :]
    length = row.shape[-1]
    kv_start = jnp.argmax(row, axis=-1).astype(jnp.int32)
    kv_end = (length - jnp.argmax(row[:, ::-1], axis=-1)).astype(jnp.int32)
    kv_end = jnp.where(jnp.any(row, axis=-1), kv_end, kv_start)
    matches = jnp.all(row == key_range_mask(kv_start, kv_end, length), axis=-1)
    return kv_start, kv_end, matches
