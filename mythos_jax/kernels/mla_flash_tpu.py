"""MLA flash attention for TPUs: Pallas kernels for the Mosaic backend.

Grid (B, H, outer blocks, inner blocks): the inner axis is the reduction ("arbitrary"), the
others "parallel". Each step receives one VMEM tile per operand through BlockSpecs; running
statistics and accumulators stay in VMEM scratch across the inner axis:
  forward  outer = query blocks, inner = key blocks:   online softmax -> out, lse;
  dq       outer = query blocks, inner = key blocks:   -> dq_nope, dq_rope;
  dkv      outer = key blocks,   inner = query blocks: -> dk_nope, dk_rope (per head), dv.
kv_start comes by scalar prefetch (SMEM): index maps clamp the blocks a causal tile skips to
a block the pipeline already holds (no copy) and ``pl.when`` skips their compute. Partial
edge blocks cover any length; tail rows hold garbage and are zeroed where they could reach a
valid result. Row statistics (m, l, lse) are kept lane-replicated, (rows, 128).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mythos_jax.kernels import tiles
from mythos_jax.kernels.tiles import positions, zero_rows

LANES = 128
SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


def tile_rows(requested: int, length: int) -> int:
    """``requested`` rows, or the whole sequence when shorter (Mosaic: a multiple of 8)."""
    if length <= requested:
        return length
    if requested % 8:
        raise ValueError(f"TPU tiles shorter than the sequence need a multiple of 8 rows, got "
                         f"{requested} (FlashBlocks) for length {length}")
    return requested


def read_column(ref) -> jax.Array:
    """(rows, 1) from a lane-replicated (rows, LANES) ref."""
    return ref[...][:, :1]


def write_column(ref, column) -> None:
    ref[...] = jnp.broadcast_to(column, ref.shape).astype(ref.dtype)


def key_blocks(kv_start, q_block, block_q, block_k, seq_len):
    """First and last key block a causal query block reads."""
    q0 = q_block * block_q
    last_row = jnp.minimum(q0 + block_q, seq_len) - 1
    return lax.div(jnp.minimum(kv_start, q0), block_k), lax.div(last_row, block_k)


# ------------------------------------------------------------------------------ kernels
def _forward_kernel(kv_start_ref, q_nope_ref, q_rope_ref, k_nope_ref, k_rope_ref, v_ref,
                    out_ref, lse_ref, m_ref, l_ref, acc_ref, *, scale, block_q, block_k,
                    seq_len):
    kv_start = kv_start_ref[pl.program_id(0)]
    q_block, k_block = pl.program_id(2), pl.program_id(3)
    first, last = key_blocks(kv_start, q_block, block_q, block_k, seq_len)

    @pl.when(k_block == 0)
    def _start():
        m, l, acc = tiles.softmax_start(block_q, acc_ref.shape[-1])
        write_column(m_ref, m)
        write_column(l_ref, l)
        acc_ref[...] = acc

    @pl.when((k_block >= first) & (k_block <= last))
    def _step():
        k0 = k_block * block_k
        s = tiles.scores(q_nope_ref[...], q_rope_ref[...], k_nope_ref[...], k_rope_ref[...],
                         scale)
        mask = tiles.causal_mask(positions(q_block * block_q, block_q, 0),
                                 positions(k0, block_k, 1), kv_start, seq_len)
        v = zero_rows(v_ref[...], positions(k0, block_k, 0), seq_len)
        m, l, acc = tiles.softmax_step(read_column(m_ref), read_column(l_ref), acc_ref[...], s,
                                       mask, v)
        write_column(m_ref, m)
        write_column(l_ref, l)
        acc_ref[...] = acc

    @pl.when(k_block == pl.num_programs(3) - 1)
    def _finish():
        out, lse = tiles.softmax_finish(read_column(m_ref), read_column(l_ref), acc_ref[...])
        out_ref[...] = out.astype(out_ref.dtype)
        write_column(lse_ref, lse)


def _dq_kernel(kv_start_ref, q_nope_ref, q_rope_ref, k_nope_ref, k_rope_ref, v_ref, out_ref,
               dout_ref, lse_ref, dq_nope_ref, dq_rope_ref, dq_nope_acc, dq_rope_acc, *,
               scale, block_q, block_k, seq_len):
    kv_start = kv_start_ref[pl.program_id(0)]
    q_block, k_block = pl.program_id(2), pl.program_id(3)
    first, last = key_blocks(kv_start, q_block, block_q, block_k, seq_len)

    @pl.when(k_block == 0)
    def _start():
        dq_nope_acc[...] = jnp.zeros(dq_nope_acc.shape, jnp.float32)
        dq_rope_acc[...] = jnp.zeros(dq_rope_acc.shape, jnp.float32)

    @pl.when((k_block >= first) & (k_block <= last))
    def _step():
        k0 = k_block * block_k
        k_rows = positions(k0, block_k, 0)
        k_nope = zero_rows(k_nope_ref[...], k_rows, seq_len)
        k_rope = zero_rows(k_rope_ref[...], k_rows, seq_len)
        dout = dout_ref[...]
        s = tiles.scores(q_nope_ref[...], q_rope_ref[...], k_nope, k_rope, scale)
        mask = tiles.causal_mask(positions(q_block * block_q, block_q, 0),
                                 positions(k0, block_k, 1), kv_start, seq_len)
        ds = tiles.score_grads(tiles.probabilities(s, mask, read_column(lse_ref)), dout,
                               zero_rows(v_ref[...], k_rows, seq_len),
                               tiles.row_dot(out_ref[...], dout), scale).astype(k_nope.dtype)
        dq_nope_acc[...] += tiles.dot(ds, k_nope)
        dq_rope_acc[...] += tiles.dot(ds, k_rope)

    @pl.when(k_block == pl.num_programs(3) - 1)
    def _finish():
        dq_nope_ref[...] = dq_nope_acc[...].astype(dq_nope_ref.dtype)
        dq_rope_ref[...] = dq_rope_acc[...].astype(dq_rope_ref.dtype)


def _dkv_kernel(kv_start_ref, q_nope_ref, q_rope_ref, k_nope_ref, k_rope_ref, v_ref, out_ref,
                dout_ref, lse_ref, dk_nope_ref, dk_rope_ref, dv_ref, dk_nope_acc, dk_rope_acc,
                dv_acc, *, scale, block_q, block_k, seq_len):
    kv_start = kv_start_ref[pl.program_id(0)]
    k_block, q_block = pl.program_id(2), pl.program_id(3)
    accumulators = (dk_nope_acc, dk_rope_acc, dv_acc)

    @pl.when(q_block == 0)
    def _start():
        for acc in accumulators:
            acc[...] = jnp.zeros(acc.shape, jnp.float32)

    @pl.when(q_block >= lax.div(k_block * block_k, block_q))
    def _step():
        q0 = q_block * block_q
        q_rows = positions(q0, block_q, 0)
        q_nope, q_rope, out, dout = (zero_rows(ref[...], q_rows, seq_len)
                                     for ref in (q_nope_ref, q_rope_ref, out_ref, dout_ref))
        s = tiles.scores(q_nope, q_rope, k_nope_ref[...], k_rope_ref[...], scale)
        mask = tiles.causal_mask(q_rows, positions(k_block * block_k, block_k, 1), kv_start,
                                 seq_len)
        p = tiles.probabilities(s, mask, read_column(lse_ref))
        ds = tiles.score_grads(p, dout, v_ref[...], tiles.row_dot(out, dout),
                               scale).astype(q_nope.dtype)
        dk_nope_acc[...] += tiles.dot(ds, q_nope, trans_a=True)
        dk_rope_acc[...] += tiles.dot(ds, q_rope, trans_a=True)
        dv_acc[...] += tiles.dot(p.astype(dout.dtype), dout, trans_a=True)

    @pl.when(q_block == pl.num_programs(3) - 1)
    def _finish():
        for ref, acc in zip((dk_nope_ref, dk_rope_ref, dv_ref), accumulators):
            ref[...] = acc[...].astype(ref.dtype)


# ------------------------------------------------------------------------------ calls
def _tile_spec(x, rows: int, block_index) -> pl.BlockSpec:
    """``rows`` rows of a (B, H, T, d) array, or of k_rope (B, T, d), at row block
    ``block_index(batch, outer, inner, kv_start_ref)``."""
    if x.ndim == 4:
        return pl.BlockSpec((None, None, rows, x.shape[-1]),
                            lambda b, h, o, i, starts: (b, h, block_index(b, o, i, starts), 0))
    return pl.BlockSpec((None, rows, x.shape[-1]),
                        lambda b, h, o, i, starts: (b, block_index(b, o, i, starts), 0))


def _call(kernel, grid, kv_start, inputs, in_specs, outputs, scratch, name, interpret):
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=grid, in_specs=in_specs,
        out_specs=[spec for _, spec in outputs],
        scratch_shapes=[pltpu.VMEM(shape, jnp.float32) for shape in scratch])
    return pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=[shape for shape, _ in outputs], name=name,
        compiler_params=pltpu.CompilerParams(dimension_semantics=SEMANTICS),
        interpret=interpret)(kv_start, *inputs)


def _query_major_specs(inputs, block_q, block_k, length):
    """Specs of (q_nope, q_rope, k_nope, k_rope, v, *query-side) for a grid over query blocks
    (outer) and key blocks (inner); skipped key blocks clamp to the causal range."""
    def key_index(b, o, i, starts):
        first, last = key_blocks(starts[b], o, block_q, block_k, length)
        return jnp.clip(i, first, last)

    def query_index(b, o, i, starts):
        return o
    return [_tile_spec(x, block_k, key_index) if 2 <= n <= 4 else
            _tile_spec(x, block_q, query_index) for n, x in enumerate(inputs)]


def forward(q_nope, q_rope, k_nope, k_rope, v, kv_start, *, scale, blocks, interpret):
    """-> out (B, H, T, v_dim) in v's dtype, lse (B, H, T, LANES) fp32 lane-replicated."""
    batch, heads, length, _ = q_nope.shape
    block_q, block_k = tile_rows(blocks.block_q, length), tile_rows(blocks.block_k, length)
    inputs = (q_nope, q_rope, k_nope, k_rope, v)
    out_spec = functools.partial(_tile_spec, rows=block_q, block_index=lambda b, o, i, s: o)
    lse = jax.ShapeDtypeStruct((batch, heads, length, LANES), jnp.float32)
    outputs = [(jax.ShapeDtypeStruct(v.shape, v.dtype), out_spec(v)), (lse, out_spec(lse))]
    kernel = functools.partial(_forward_kernel, scale=scale, block_q=block_q, block_k=block_k,
                               seq_len=length)
    scratch = [(block_q, LANES), (block_q, LANES), (block_q, v.shape[-1])]
    grid = (batch, heads, pl.cdiv(length, block_q), pl.cdiv(length, block_k))
    return _call(kernel, grid, kv_start, inputs,
                 _query_major_specs(inputs, block_q, block_k, length), outputs, scratch,
                 "mla_flash_forward", interpret)


def backward(q_nope, q_rope, k_nope, k_rope, v, kv_start, out, lse, dout, *, scale, blocks,
             interpret):
    """-> dq_nope, dq_rope, dk_nope, dk_rope per head (B, H, T, rope) fp32, dv."""
    batch, heads, length, _ = q_nope.shape
    block_q = tile_rows(blocks.block_q_bwd, length)
    block_k = tile_rows(blocks.block_k_bwd, length)
    inputs = (q_nope, q_rope, k_nope, k_rope, v, out, dout, lse)
    sizes = dict(scale=scale, block_q=block_q, block_k=block_k, seq_len=length)
    n_q, n_k = pl.cdiv(length, block_q), pl.cdiv(length, block_k)

    q_tile = functools.partial(_tile_spec, rows=block_q, block_index=lambda b, o, i, s: o)
    dq = _call(functools.partial(_dq_kernel, **sizes), (batch, heads, n_q, n_k), kv_start,
               inputs, _query_major_specs(inputs, block_q, block_k, length),
               [(jax.ShapeDtypeStruct(x.shape, x.dtype), q_tile(x)) for x in (q_nope, q_rope)],
               [(block_q, q_nope.shape[-1]), (block_q, q_rope.shape[-1])], "mla_flash_dq",
               interpret)

    def query_index(b, o, i, starts):       # query blocks before the key block's diagonal
        return jnp.maximum(i, lax.div(o * block_k, block_q))   # are skipped: clamp to it
    k_tile = functools.partial(_tile_spec, rows=block_k, block_index=lambda b, o, i, s: o)
    in_specs = [k_tile(x) if 2 <= n <= 4 else _tile_spec(x, block_q, query_index)
                for n, x in enumerate(inputs)]
    grads = (jax.ShapeDtypeStruct(k_nope.shape, k_nope.dtype),
             jax.ShapeDtypeStruct(q_rope.shape, jnp.float32),
             jax.ShapeDtypeStruct(v.shape, v.dtype))
    dkv = _call(functools.partial(_dkv_kernel, **sizes), (batch, heads, n_k, n_q), kv_start,
                inputs, in_specs, [(g, k_tile(g)) for g in grads],
                [(block_k, g.shape[-1]) for g in grads], "mla_flash_dkv", interpret)
    return (*dq, *dkv)
