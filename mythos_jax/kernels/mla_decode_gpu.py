"""Latent MLA decode for GPUs: a Pallas kernel for the Triton backend.

Grid (B, head blocks, splits): each program takes ``block_h`` absorbed queries of one
sequence and loops (``lax.fori_loop``) over the ``block_k``-slot tiles of its split that
overlap the valid range, keeping the online softmax in registers; it writes its normalised
partial output and log-sum-exp for ``mla_decode.combine_splits``. The cache refs span one
sequence; tiles load with masks (slots past the end read as 0).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from mythos_jax.kernels import mla_flash_gpu, tiles
from mythos_jax.kernels.tiles import positions

tile_rows = mla_flash_gpu.tile_rows     # Triton's tile rule, as for flash attention


def _kernel(kv_start_ref, kv_end_ref, q_latent_ref, q_rope_ref, c_kv_ref, k_rope_ref, out_ref,
            lse_ref, *, scale, block_k, split_len, length):
    split_start = pl.program_id(2) * split_len
    lo = jnp.maximum(kv_start_ref[...], split_start)
    hi = jnp.minimum(kv_end_ref[...], jnp.minimum(split_start + split_len, length))
    q_latent, q_rope = q_latent_ref[...], q_rope_ref[...]

    def body(kb, state):
        k0 = kb * block_k
        c_kv = mla_flash_gpu.load_rows(c_kv_ref, k0, block_k, length)
        k_rope = mla_flash_gpu.load_rows(k_rope_ref, k0, block_k, length)
        mask = tiles.range_mask(positions(k0, block_k, 1), lo, hi)
        return tiles.softmax_step(*state, tiles.scores(q_latent, q_rope, c_kv, k_rope, scale),
                                  mask, c_kv)

    state = lax.fori_loop(lax.div(lo, block_k), lax.div(hi + block_k - 1, block_k), body,
                          tiles.softmax_start(q_latent.shape[0], c_kv_ref.shape[-1]))
    out, lse = tiles.softmax_finish(*state)
    out_ref[...] = out
    lse_ref[...] = lse.reshape(lse_ref.shape)


def partials(q_latent, q_rope, c_kv, k_rope, kv_start, kv_end, *, scale, plan, blocks,
             interpret):
    """-> out (B, splits, H, kv_lora) fp32 normalised per split, lse (B, splits, H) fp32;
    ``plan`` a ``mla_decode.DecodePlan``, ``blocks`` gives Triton's warps and stages."""
    batch, heads, latent = q_latent.shape
    block_h = plan.block_h
    kernel = functools.partial(_kernel, scale=scale, block_k=plan.block_k,
                               split_len=plan.blocks_per_split * plan.block_k,
                               length=c_kv.shape[1])

    def heads_spec(x):
        return pl.BlockSpec((None, block_h, x.shape[-1]), lambda b, h, p: (b, h, 0))

    def cache_spec(x):
        return pl.BlockSpec((None,) + x.shape[1:], lambda b, h, p: (b, 0, 0))

    scalar_spec = pl.BlockSpec((None,), lambda b, h, p: (b,))
    out_shapes = (jax.ShapeDtypeStruct((batch, plan.num_splits, heads, latent), jnp.float32),
                  jax.ShapeDtypeStruct((batch, plan.num_splits, heads), jnp.float32))
    return pl.pallas_call(
        kernel, grid=(batch, pl.cdiv(heads, block_h), plan.num_splits), out_shape=out_shapes,
        in_specs=[scalar_spec, scalar_spec, heads_spec(q_latent), heads_spec(q_rope),
                  cache_spec(c_kv), cache_spec(k_rope)],
        out_specs=[pl.BlockSpec((None, None, block_h, latent), lambda b, h, p: (b, p, h, 0)),
                   pl.BlockSpec((None, None, block_h), lambda b, h, p: (b, p, h))],
        compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps or 4,
                                                num_stages=blocks.num_stages),
        interpret=interpret, name="mla_decode")(kv_start, kv_end, q_latent, q_rope, c_kv,
                                                 k_rope)
