"""Latent MLA decode for TPUs: a Pallas kernel for the Mosaic backend.

Grid (B, head blocks, splits, tiles per split); the last axis is the reduction
("arbitrary"). Each step gets one ``block_k``-slot tile of c_kv and k_rope in VMEM; the
online softmax of the ``block_h`` queries lives in VMEM scratch; the last step of a split
writes its normalised partial output and log-sum-exp for ``mla_decode.combine_splits``.
kv_start / kv_end come by scalar prefetch: tiles outside the valid range are clamped to one
the pipeline already holds (no copy) and skipped. Slots past the end of the cache (a partial
last tile) are zeroed before use.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mythos_jax.kernels import mla_flash_tpu, tiles
from mythos_jax.kernels.mla_flash_tpu import LANES, SEMANTICS, read_column, write_column
from mythos_jax.kernels.tiles import positions, zero_rows

tile_rows = mla_flash_tpu.tile_rows     # Mosaic's tile rule, as for flash attention


def valid_tiles(kv_start, kv_end, block_k: int, n_tiles: int):
    """First and last tile overlapping [kv_start, kv_end), clamped to existing tiles."""
    last = jnp.minimum(lax.div(jnp.maximum(kv_end - 1, 0), block_k), n_tiles - 1)
    return jnp.minimum(lax.div(kv_start, block_k), last), last


def _kernel(kv_start_ref, kv_end_ref, q_latent_ref, q_rope_ref, c_kv_ref, k_rope_ref, out_ref,
            lse_ref, m_ref, l_ref, acc_ref, *, scale, block_k, per_split, length):
    batch, step = pl.program_id(0), pl.program_id(3)
    kv_start, kv_end = kv_start_ref[batch], kv_end_ref[batch]
    tile = pl.program_id(2) * per_split + step
    first, last = valid_tiles(kv_start, kv_end, block_k, pl.cdiv(length, block_k))

    @pl.when(step == 0)
    def _start():
        m, l, acc = tiles.softmax_start(acc_ref.shape[0], acc_ref.shape[1])
        write_column(m_ref, m)
        write_column(l_ref, l)
        acc_ref[...] = acc

    @pl.when((tile >= first) & (tile <= last) & (kv_end > kv_start))
    def _step():
        k0 = tile * block_k
        c_kv = zero_rows(c_kv_ref[...], positions(k0, block_k, 0), length)
        s = tiles.scores(q_latent_ref[...], q_rope_ref[...], c_kv, k_rope_ref[...], scale)
        mask = tiles.range_mask(positions(k0, block_k, 1), kv_start, kv_end)
        m, l, acc = tiles.softmax_step(read_column(m_ref), read_column(l_ref), acc_ref[...], s,
                                       mask, c_kv)
        write_column(m_ref, m)
        write_column(l_ref, l)
        acc_ref[...] = acc

    @pl.when(step == per_split - 1)
    def _finish():
        out, lse = tiles.softmax_finish(read_column(m_ref), read_column(l_ref), acc_ref[...])
        out_ref[...] = out
        write_column(lse_ref, lse)


def partials(q_latent, q_rope, c_kv, k_rope, kv_start, kv_end, *, scale, plan, blocks,
             interpret):
    """-> out (B, splits, H, kv_lora) fp32 normalised per split, lse (B, splits, H) fp32;
    ``plan`` a ``mla_decode.DecodePlan`` (``blocks`` is unused on TPU)."""
    del blocks
    batch, heads, latent = q_latent.shape
    length = c_kv.shape[1]
    block_h, block_k, per_split = plan.block_h, plan.block_k, plan.blocks_per_split
    n_tiles = pl.cdiv(length, block_k)

    def heads_spec(x):
        return pl.BlockSpec((None, block_h, x.shape[-1]), lambda b, h, p, t, s, e: (b, h, 0))

    def cache_spec(x):
        def index(b, h, p, t, starts, ends):
            first, last = valid_tiles(starts[b], ends[b], block_k, n_tiles)
            return b, jnp.clip(p * per_split + t, first, last), 0
        return pl.BlockSpec((None, block_k, x.shape[-1]), index)

    def split_spec(width):
        return pl.BlockSpec((None, None, block_h, width), lambda b, h, p, t, s, e: (b, p, h, 0))

    grid = (batch, pl.cdiv(heads, block_h), plan.num_splits, per_split)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=grid,
        in_specs=[heads_spec(q_latent), heads_spec(q_rope), cache_spec(c_kv),
                  cache_spec(k_rope)],
        out_specs=[split_spec(latent), split_spec(LANES)],
        scratch_shapes=[pltpu.VMEM((block_h, LANES), jnp.float32),
                        pltpu.VMEM((block_h, LANES), jnp.float32),
                        pltpu.VMEM((block_h, latent), jnp.float32)])
    out_shapes = [jax.ShapeDtypeStruct((batch, plan.num_splits, heads, latent), jnp.float32),
                  jax.ShapeDtypeStruct((batch, plan.num_splits, heads, LANES), jnp.float32)]
    kernel = functools.partial(_kernel, scale=scale, block_k=block_k, per_split=per_split,
                               length=length)
    out, lse = pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=out_shapes, name="mla_decode",
        compiler_params=pltpu.CompilerParams(dimension_semantics=SEMANTICS),
        interpret=interpret)(kv_start, kv_end, q_latent, q_rope, c_kv, k_rope)
    return out, lse[..., 0]
