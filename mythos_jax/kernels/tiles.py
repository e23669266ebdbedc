"""Tile math shared by every MLA kernel (flash and decode, GPU and TPU).

The functions act on 2-D tiles already loaded from refs: rows are queries (heads in decode),
columns keys. Row statistics are (rows, 1) columns. Scores are ``(q_a.k_a + q_b.k_b) * scale``
in fp32: (nope, rope) parts for flash attention, (latent, rope) for decode. Masked scores use
a finite MASK_VALUE and masked probabilities are zeroed explicitly, so a row that sees no key
in a tile (or at all) never produces NaN.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def dot(a, b, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """2-D matmul with fp32 accumulation; ``trans_*`` contract over a's rows / b's columns."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def scores(q_a, q_b, k_a, k_b, scale: float) -> jax.Array:
    """(rows, da), (rows, db) against (cols, da), (cols, db) -> (rows, cols) fp32."""
    return (dot(q_a, k_a, trans_b=True) + dot(q_b, k_b, trans_b=True)) * scale


def causal_mask(q_pos, k_pos, kv_start, seq_len: int) -> jax.Array:
    """q_pos (rows, 1), k_pos (1, cols) -> bool (rows, cols):
    ``min(kv_start, i) <= j <= i < seq_len`` (see ``masks.causal_start_mask``)."""
    return (k_pos <= q_pos) & (k_pos >= jnp.minimum(kv_start, q_pos)) & (q_pos < seq_len)


def range_mask(k_pos, kv_start, kv_end) -> jax.Array:
    """k_pos (1, cols) -> bool (1, cols): ``kv_start <= j < kv_end``."""
    return (k_pos >= kv_start) & (k_pos < kv_end)


def positions(start, size: int, axis: int) -> jax.Array:
    """start + [0, size) as a (size, 1) column (axis 0) or (1, size) row (axis 1), int32."""
    shape = (size, 1) if axis == 0 else (1, size)
    return start + jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def zero_rows(tile, row_pos, limit) -> jax.Array:
    """Zero the rows of ``tile`` whose position (rows, 1) is >= limit (tails past the array
    hold garbage, possibly NaN, and a zero probability times NaN is NaN)."""
    return jnp.where(row_pos < limit, tile, jnp.zeros_like(tile))


def softmax_start(rows: int, width: int):
    """Online-softmax state: running max m and sum l (rows, 1), accumulator (rows, width)."""
    return (jnp.full((rows, 1), MASK_VALUE, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, width), jnp.float32))


def softmax_step(m, l, acc, s, mask, values):
    """Fold one tile of scores s (rows, cols) and its values (cols, width) into the state."""
    s = jnp.where(mask, s, MASK_VALUE)
    m_next = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m - m_next)
    p = jnp.where(mask, jnp.exp(s - m_next), 0.0)
    l_next = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    return m_next, l_next, alpha * acc + dot(p.astype(values.dtype), values)


def softmax_finish(m, l, acc):
    """-> (acc / l (rows, width), log-sum-exp (rows, 1)); a row that saw no key: 0 and -inf."""
    seen = l > 0
    safe_l = jnp.where(seen, l, 1.0)
    return (jnp.where(seen, acc / safe_l, 0.0),
            jnp.where(seen, m + jnp.log(safe_l), -jnp.inf))


def probabilities(s, mask, lse) -> jax.Array:
    """Softmax probabilities of a tile from the forward's log-sum-exp (rows, 1)."""
    return jnp.where(mask, jnp.exp(s - lse), 0.0)


def row_dot(out, dout) -> jax.Array:
    """delta = rowsum(out * dout) (rows, 1) fp32, the softmax backward's correction."""
    return jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=1, keepdims=True)


def score_grads(p, dout, values, delta, scale: float) -> jax.Array:
    """d(q.k) (rows, cols) fp32 from probabilities p, dout (rows, width), values (cols, width)."""
    return p * (dot(dout, values, trans_b=True) - delta) * scale


def check_block_sizes(blocks) -> None:
    """Every set field of the block-size dataclass ``blocks`` must be a positive int."""
    for field in dataclasses.fields(blocks):
        value = getattr(blocks, field.name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{type(blocks).__name__}.{field.name} must be a positive int, "
                             f"got {value!r}")
