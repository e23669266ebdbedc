"""MLA flash attention for GPUs: Pallas kernels for the Triton backend.

One program per (batch, head, row block) holds its tile in registers and loops over the
other axis with ``lax.fori_loop`` (Triton has no scratch memory or scalar prefetch):
  forward  (B, H, T/block_q):      loop over key blocks, online softmax -> out, lse;
  dq       (B, H, T/block_q_bwd):  loop over key blocks -> dq_nope, dq_rope;
  dkv      (B, H, T/block_k_bwd):  loop over query blocks -> dk_nope, dk_rope (per head), dv.
Refs span the whole sequence of one (batch, head); tiles are loaded with masks, so any length
works (rows past the end read as 0). Causal block skipping: a query block reads key blocks
from ``min(kv_start, first row)`` to its diagonal only. The backward recomputes
delta = rowsum(out * dout) from the tiles it loads (no separate pass). Triton needs
power-of-two tiles of at least 16 rows; head dims are checked by
``dispatch.unsupported_reason``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from mythos_jax.kernels import tiles
from mythos_jax.kernels.tiles import positions


def tile_rows(requested: int, length: int) -> int:
    """A power-of-two row count >= 16: ``requested``, or less for a short sequence."""
    return max(16, min(requested, pl.next_power_of_2(length)))


def load_rows(ref, start, size: int, limit: int) -> jax.Array:
    """Rows [start, start + size) of a (L, width) or (L,) ref; rows >= limit read as 0."""
    pos = positions(start, size, 0)
    if len(ref.shape) == 1:
        tile = pltriton.load(ref.at[pl.ds(start, size)], mask=pos[:, 0] < limit, other=0.0)
        return tile.reshape(size, 1)
    return pltriton.load(ref.at[pl.ds(start, size), :], mask=pos < limit, other=0.0)


def store_rows(ref, start, tile, limit: int) -> None:
    """Write ``tile`` (size, width) or a (size, 1) column of a 1-D ref at rows [start, ...)."""
    size = tile.shape[0]
    pos = positions(start, size, 0)
    if len(ref.shape) == 1:
        pltriton.store(ref.at[pl.ds(start, size)], tile.reshape(size).astype(ref.dtype),
                       mask=pos[:, 0] < limit)
    else:
        pltriton.store(ref.at[pl.ds(start, size), :], tile.astype(ref.dtype), mask=pos < limit)


# ------------------------------------------------------------------------------ kernels
def _forward_kernel(kv_start_ref, q_nope_ref, q_rope_ref, k_nope_ref, k_rope_ref, v_ref,
                    out_ref, lse_ref, *, scale, block_q, block_k, seq_len):
    kv_start = kv_start_ref[...]
    q0 = pl.program_id(2) * block_q
    q_pos = positions(q0, block_q, 0)
    q_nope = load_rows(q_nope_ref, q0, block_q, seq_len)
    q_rope = load_rows(q_rope_ref, q0, block_q, seq_len)

    def body(kb, state):
        k0 = kb * block_k
        s = tiles.scores(q_nope, q_rope, load_rows(k_nope_ref, k0, block_k, seq_len),
                         load_rows(k_rope_ref, k0, block_k, seq_len), scale)
        mask = tiles.causal_mask(q_pos, positions(k0, block_k, 1), kv_start, seq_len)
        return tiles.softmax_step(*state, s, mask, load_rows(v_ref, k0, block_k, seq_len))

    first = lax.div(jnp.minimum(kv_start, q0), block_k)
    last = lax.div(jnp.minimum(q0 + block_q, seq_len) + block_k - 1, block_k)
    state = lax.fori_loop(first, last, body, tiles.softmax_start(block_q, v_ref.shape[-1]))
    out, lse = tiles.softmax_finish(*state)
    store_rows(out_ref, q0, out, seq_len)
    store_rows(lse_ref, q0, lse, seq_len)


def _query_side(q0, size, seq_len, q_nope_ref, q_rope_ref, out_ref, dout_ref, lse_ref):
    """Query tiles of rows [q0, q0 + size): q_nope, q_rope, dout, lse and delta."""
    dout = load_rows(dout_ref, q0, size, seq_len)
    delta = tiles.row_dot(load_rows(out_ref, q0, size, seq_len), dout)
    return (load_rows(q_nope_ref, q0, size, seq_len), load_rows(q_rope_ref, q0, size, seq_len),
            dout, load_rows(lse_ref, q0, size, seq_len), delta)


def _dq_kernel(kv_start_ref, q_nope_ref, q_rope_ref, k_nope_ref, k_rope_ref, v_ref, out_ref,
               dout_ref, lse_ref, dq_nope_ref, dq_rope_ref, *, scale, block_q, block_k,
               seq_len):
    kv_start = kv_start_ref[...]
    q0 = pl.program_id(2) * block_q
    q_pos = positions(q0, block_q, 0)
    q_nope, q_rope, dout, lse, delta = _query_side(q0, block_q, seq_len, q_nope_ref,
                                                   q_rope_ref, out_ref, dout_ref, lse_ref)

    def body(kb, grads):
        k0 = kb * block_k
        k_nope = load_rows(k_nope_ref, k0, block_k, seq_len)
        k_rope = load_rows(k_rope_ref, k0, block_k, seq_len)
        s = tiles.scores(q_nope, q_rope, k_nope, k_rope, scale)
        mask = tiles.causal_mask(q_pos, positions(k0, block_k, 1), kv_start, seq_len)
        ds = tiles.score_grads(tiles.probabilities(s, mask, lse), dout,
                               load_rows(v_ref, k0, block_k, seq_len), delta, scale)
        ds = ds.astype(k_nope.dtype)
        return grads[0] + tiles.dot(ds, k_nope), grads[1] + tiles.dot(ds, k_rope)

    first = lax.div(jnp.minimum(kv_start, q0), block_k)
    last = lax.div(jnp.minimum(q0 + block_q, seq_len) + block_k - 1, block_k)
    zeros = (jnp.zeros((block_q, q_nope.shape[1]), jnp.float32),
             jnp.zeros((block_q, q_rope.shape[1]), jnp.float32))
    dq_nope, dq_rope = lax.fori_loop(first, last, body, zeros)
    store_rows(dq_nope_ref, q0, dq_nope, seq_len)
    store_rows(dq_rope_ref, q0, dq_rope, seq_len)


def _dkv_kernel(kv_start_ref, q_nope_ref, q_rope_ref, k_nope_ref, k_rope_ref, v_ref, out_ref,
                dout_ref, lse_ref, dk_nope_ref, dk_rope_ref, dv_ref, *, scale, block_q,
                block_k, seq_len):
    kv_start = kv_start_ref[...]
    k0 = pl.program_id(2) * block_k
    k_pos = positions(k0, block_k, 1)
    k_nope = load_rows(k_nope_ref, k0, block_k, seq_len)
    k_rope = load_rows(k_rope_ref, k0, block_k, seq_len)
    v = load_rows(v_ref, k0, block_k, seq_len)

    def body(qb, grads):
        q0 = qb * block_q
        q_nope, q_rope, dout, lse, delta = _query_side(q0, block_q, seq_len, q_nope_ref,
                                                       q_rope_ref, out_ref, dout_ref, lse_ref)
        s = tiles.scores(q_nope, q_rope, k_nope, k_rope, scale)
        p = tiles.probabilities(s, tiles.causal_mask(positions(q0, block_q, 0), k_pos,
                                                     kv_start, seq_len), lse)
        ds = tiles.score_grads(p, dout, v, delta, scale).astype(q_nope.dtype)
        return (grads[0] + tiles.dot(ds, q_nope, trans_a=True),
                grads[1] + tiles.dot(ds, q_rope, trans_a=True),
                grads[2] + tiles.dot(p.astype(dout.dtype), dout, trans_a=True))

    zeros = tuple(jnp.zeros((block_k, ref.shape[-1]), jnp.float32)
                  for ref in (k_nope_ref, k_rope_ref, v_ref))
    grads = lax.fori_loop(lax.div(k0, block_q), pl.cdiv(seq_len, block_q), body, zeros)
    for ref, grad in zip((dk_nope_ref, dk_rope_ref, dv_ref), grads):
        store_rows(ref, k0, grad, seq_len)


# ------------------------------------------------------------------------------ calls
def _head_spec(x) -> pl.BlockSpec:
    """The whole sequence of one (batch, head) of a (B, H, T[, d]) array."""
    return pl.BlockSpec((None, None) + x.shape[2:], lambda b, h, i: (b, h) + (0,) * (x.ndim - 2))


def _batch_spec(x) -> pl.BlockSpec:
    """One batch entry of a per-sequence array: kv_start (B,) or k_rope (B, T, rope)."""
    return pl.BlockSpec((None,) + x.shape[1:], lambda b, h, i: (b,) + (0,) * (x.ndim - 1))


def _call(kernel, grid, inputs, out_shapes, blocks, name, interpret):
    """inputs = (kv_start, q_nope, q_rope, k_nope, k_rope, v, *per-head arrays)."""
    in_specs = [_batch_spec(x) if i in (0, 4) else _head_spec(x) for i, x in enumerate(inputs)]
    widest = max(x.shape[-1] for x in inputs[1:6])
    warps = blocks.num_warps or (4 if widest <= 64 else 8)
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=[_head_spec(x) for x in out_shapes],
        out_shape=out_shapes, interpret=interpret, name=name,
        compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=blocks.num_stages),
    )(*inputs)


def forward(q_nope, q_rope, k_nope, k_rope, v, kv_start, *, scale, blocks, interpret):
    """-> out (B, H, T, v_dim) in v's dtype, lse (B, H, T) fp32 (the backward's residual)."""
    batch, heads, length, _ = q_nope.shape
    block_q, block_k = tile_rows(blocks.block_q, length), tile_rows(blocks.block_k, length)
    kernel = functools.partial(_forward_kernel, scale=scale, block_q=block_q, block_k=block_k,
                               seq_len=length)
    out_shapes = (jax.ShapeDtypeStruct(v.shape, v.dtype),
                  jax.ShapeDtypeStruct((batch, heads, length), jnp.float32))
    return _call(kernel, (batch, heads, pl.cdiv(length, block_q)),
                 (kv_start, q_nope, q_rope, k_nope, k_rope, v), out_shapes, blocks,
                 "mla_flash_forward", interpret)


def backward(q_nope, q_rope, k_nope, k_rope, v, kv_start, out, lse, dout, *, scale, blocks,
             interpret):
    """-> dq_nope, dq_rope, dk_nope, dk_rope per head (B, H, T, rope) fp32, dv."""
    batch, heads, length, _ = q_nope.shape
    block_q = tile_rows(blocks.block_q_bwd, length)
    block_k = tile_rows(blocks.block_k_bwd, length)
    inputs = (kv_start, q_nope, q_rope, k_nope, k_rope, v, out, dout, lse)
    sizes = dict(scale=scale, block_q=block_q, block_k=block_k, seq_len=length)
    like = lambda x, dtype=None: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype)  # noqa: E731
    dq = _call(functools.partial(_dq_kernel, **sizes), (batch, heads, pl.cdiv(length, block_q)),
               inputs, (like(q_nope), like(q_rope)), blocks, "mla_flash_dq", interpret)
    dk_rope_shape = jax.ShapeDtypeStruct(q_rope.shape, jnp.float32)
    dkv = _call(functools.partial(_dkv_kernel, **sizes), (batch, heads, pl.cdiv(length, block_k)),
                inputs, (like(k_nope), dk_rope_shape, like(v)), blocks, "mla_flash_dkv",
                interpret)
    return (*dq, *dkv)
