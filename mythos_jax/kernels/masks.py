"""Which keys each query may attend, as offsets (what the kernels take), and the dense
boolean masks the XLA einsum path and the references build from them.

One rule covers training, prefill and decode. Query i of a call sits at cache slot
``q_offset + i`` (``q_offset`` one for the batch, or one per sequence (B,)); it sees the keys
j with ``min(kv_start, q_offset + i) <= j <= q_offset + i``:
  training   kv_start = 0, q_offset = 0: plain causal;
  prefill    kv_start = each sequence's first real slot (left padding), q_offset = 0: causal
             from kv_start, and a padding row (i < kv_start) sees itself only, so that its
             softmax is defined;
  chunked    q_offset = each sequence's cache index: the cached keys kv_start .. and the new
             ones up to the query (right padding after a sequence's new tokens is never
             seen by them);
  decode     one query at slot q_offset = the cache index: keys kv_start .. q_offset.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class KeySpan(NamedTuple):
    """The attention span of a forward: kv_start (B,) int32, q_offset () or (B,) int32."""
    kv_start: jax.Array
    q_offset: jax.Array

    @classmethod
    def causal(cls, batch: int) -> "KeySpan":
        return cls(jnp.zeros((batch,), jnp.int32), jnp.int32(0))

    def kv_end(self) -> jax.Array:
        """(B,) one past the last key a one-token (decode) call sees."""
        return jnp.broadcast_to(self.q_offset + 1, self.kv_start.shape).astype(jnp.int32)

    def dense(self, queries: int, keys: int) -> jax.Array:
        """bool (B, queries, keys), True where a query may attend a key."""
        rows = jnp.reshape(self.q_offset, (-1, 1, 1)) + jnp.arange(queries)[:, None]
        cols = jnp.arange(keys)[None, :]
        return (cols <= rows) & (cols >= jnp.minimum(self.kv_start[:, None, None], rows))

    def real_rows(self, queries: int, lengths=None) -> jax.Array:
        """bool (B, queries): the queries that are tokens, not padding: at or after
        kv_start, and before ``lengths`` (B,) new tokens when given (right padding)."""
        rows = jnp.reshape(self.q_offset, (-1, 1)) + jnp.arange(queries)
        real = rows >= self.kv_start[:, None]
        if lengths is not None:
            real = real & (jnp.arange(queries) < lengths[:, None])
        return real


def causal_start_mask(kv_start: jax.Array, length: int) -> jax.Array:
    """kv_start (B,) -> bool (B, T, T): the prefill mask of the module docstring."""
    return KeySpan(kv_start, jnp.int32(0)).dense(length, length)


def key_range_mask(kv_start: jax.Array, kv_end: jax.Array, length: int) -> jax.Array:
    """kv_start, kv_end (B,) -> bool (B, S): keys in [kv_start, kv_end) (the decode kernel's
    range)."""
    cols = jnp.arange(length)[None, :]
    return (cols >= kv_start[:, None]) & (cols < kv_end[:, None])
