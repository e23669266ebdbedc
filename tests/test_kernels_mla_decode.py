"""Latent MLA decode kernels (GPU/Triton and TPU/Mosaic styles) in interpret mode against the
pure-JAX reference: per-sequence valid ranges of a left-padded cache, head counts that are
not a multiple of the head block, several splits, rope dims, fp32 and bf16; the split combine;
the TPU kernel once under ``pltpu.InterpretParams``; the XLA fallback."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from mythos_jax.kernels import KernelTarget, dispatch
from mythos_jax.kernels.mla_decode import (DecodeBlocks, combine_splits, mla_decode_attention,
                                           plan_decode)
from mythos_jax.kernels.reference import mla_decode_reference
from numerics import relative_error

# experiments/README.md (bench_attention): the fp32 decode kernels are 3.6e-7..4.2e-7 from the
# reference, relative to its largest value (4x margin); bf16: at most twice XLA's own bf16
# error (README: 1.8e-3 against 2.3e-3) plus a margin for inputs where XLA's is ~0.
FP32_RTOL = 2e-6
BF16_MARGIN = 4e-3


def make_inputs(batch, heads, length, latent, rope, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    shapes = [(batch, heads, latent), (batch, heads, rope), (batch, length, latent),
              (batch, length, rope)]
    return [jax.random.normal(k, s, jnp.float32).astype(dtype)
            for k, s in zip(keys, shapes, strict=True)]


# backend, heads, length, latent, rope, blocks, dtype
CASES = [
    ("gpu", 5, 45, 32, 16, DecodeBlocks(block_h=16, block_k=16, num_splits=2), "float32"),
    ("gpu", 20, 70, 16, 64, DecodeBlocks(block_h=16, block_k=16), "float32"),   # auto splits
    ("gpu", 20, 70, 16, 64, DecodeBlocks(block_h=16, block_k=16), "bfloat16"),
    ("tpu", 12, 37, 32, 32, DecodeBlocks(block_h=8, block_k=8, num_splits=3), "float32"),
    ("tpu", 3, 50, 16, 16, DecodeBlocks(block_h=8, block_k=16, num_splits=1), "float32"),
    ("tpu", 12, 37, 32, 32, DecodeBlocks(block_h=8, block_k=8, num_splits=3), "bfloat16"),
]


@pytest.mark.parametrize("backend,heads,length,latent,rope,blocks,dtype", CASES)
def test_matches_reference(backend, heads, length, latent, rope, blocks, dtype):
    dtype = jnp.dtype(dtype)
    arrays = make_inputs(3, heads, length, latent, rope, dtype)
    kv_start = jnp.asarray([0, 9, length - 4], jnp.int32)     # left padding of 0, 9, ...
    kv_end = jnp.asarray([length, 30, length - 1], jnp.int32)  # ... and the current index
    scale = (latent + rope) ** -0.5
    got = jax.jit(lambda *a: mla_decode_attention(
        *a, kv_start, kv_end, scale=scale, blocks=blocks,
        target=KernelTarget(backend, True)))(*arrays)
    assert got.dtype == dtype
    exact = mla_decode_reference(*[x.astype(jnp.float32) for x in arrays], kv_start, kv_end,
                                 scale=scale)
    if dtype == jnp.float32:
        assert relative_error(got, exact) < FP32_RTOL
    else:
        xla = mla_decode_reference(*arrays, kv_start, kv_end, scale=scale)
        assert relative_error(got, exact) < 2 * relative_error(xla, exact) + BF16_MARGIN


def test_tpu_kernel_under_tpu_interpret_params():
    arrays = make_inputs(2, 12, 20, 16, 8, jnp.float32)
    kv_start, kv_end = jnp.asarray([0, 5], jnp.int32), jnp.asarray([20, 13], jnp.int32)
    got = mla_decode_attention(*arrays, kv_start, kv_end, scale=0.3,
                               blocks=DecodeBlocks(block_h=8, block_k=8, num_splits=2),
                               target=KernelTarget("tpu", pltpu.InterpretParams(
                                   detect_races=True)))
    want = mla_decode_reference(*arrays, kv_start, kv_end, scale=0.3)
    assert relative_error(got, want) < FP32_RTOL


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_a_sequence_without_valid_slots_gives_zeros(backend):
    arrays = make_inputs(2, 4, 24, 16, 16, jnp.float32)
    kv_start, kv_end = jnp.asarray([3, 10], jnp.int32), jnp.asarray([3, 24], jnp.int32)
    got = mla_decode_attention(*arrays, kv_start, kv_end, scale=0.3,
                               blocks=DecodeBlocks(block_h=8, block_k=8, num_splits=2),
                               target=KernelTarget(backend, True))
    assert np.all(np.asarray(got[0]) == 0)
    want = mla_decode_reference(*arrays, kv_start, kv_end, scale=0.3)
    assert relative_error(got[1], want[1]) < FP32_RTOL


def test_combine_splits_is_the_softmax_over_all_slots():
    scores = np.random.default_rng(0).normal(size=(1, 1, 12))
    values = np.random.default_rng(1).normal(size=(1, 12, 4))
    outs, lses = [], []
    for idx in np.split(np.arange(12), [5, 5, 9]):           # one split is empty
        s = scores[..., idx]
        lse = np.log(np.exp(s).sum(-1)) if idx.size else np.full((1, 1), -np.inf)
        outs.append(np.einsum("bhs,bsc->bhc", np.exp(s - lse[..., None]), values[:, idx]))
        lses.append(lse)
    got = combine_splits(jnp.asarray(np.stack(outs, 1), jnp.float32),
                         jnp.asarray(np.stack(lses, 1), jnp.float32))
    probs = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
    np.testing.assert_allclose(got, np.einsum("bhs,bsc->bhc", probs, values), atol=1e-6)


def test_split_plan_covers_the_cache_with_whole_tiles():
    plan = plan_decode(1, 16, 4096, DecodeBlocks(block_h=16, block_k=64), "gpu")
    assert plan.num_splits * plan.blocks_per_split * plan.block_k >= 4096
    assert (plan.num_splits - 1) * plan.blocks_per_split * plan.block_k < 4096
    assert plan.num_splits == 64       # 64 tiles: one per split to approach 128 programs
    assert plan_decode(8, 16, 100, DecodeBlocks(num_splits=50), "tpu").num_splits == 2  # tiles


def test_unsupported_dims_fall_back_to_xla_with_one_log_line(caplog, monkeypatch):
    arrays = make_inputs(1, 4, 10, 24, 8, jnp.float32)
    kv_start, kv_end = jnp.zeros((1,), jnp.int32), jnp.full((1,), 10, jnp.int32)
    monkeypatch.setattr(dispatch, "_logged", set())           # log_once: a fresh record
    with caplog.at_level(logging.WARNING, logger="mythos_jax.kernels"):
        for _ in range(2):
            got = mla_decode_attention(*arrays, kv_start, kv_end, scale=0.3,
                                       target=KernelTarget("gpu", False))
    np.testing.assert_array_equal(got, mla_decode_reference(*arrays, kv_start, kv_end,
                                                            scale=0.3))
    lines = [r.getMessage() for r in caplog.records if "falls back to XLA" in r.getMessage()]
    assert len(lines) == 1 and "kv_lora" in lines[0]


def test_shape_errors_name_the_array():
    q_latent, q_rope, c_kv, k_rope = make_inputs(2, 4, 10, 16, 8, jnp.float32)
    index = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="k_rope must have shape"):
        mla_decode_attention(q_latent, q_rope, c_kv, k_rope[:, :5], index, index, scale=1.0)
    with pytest.raises(ValueError, match="kv_end must have shape"):
        mla_decode_attention(q_latent, q_rope, c_kv, k_rope, index, index[:1], scale=1.0)
