"""MLA flash attention kernels (GPU/Triton and TPU/Mosaic styles) in interpret mode against
the pure-JAX reference: values and gradients over odd lengths, head counts, rope / value
dims, left padding, fp32 and bf16; the TPU kernels once under ``pltpu.InterpretParams``;
lowering for real CUDA and TPU targets; the XLA fallback."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from mythos_jax.kernels import FlashBlocks, KernelTarget, dispatch, mla_flash_attention
from mythos_jax.kernels.reference import mla_flash_reference
from numerics import relative_error

GRAD_ARGS = (0, 1, 2, 3, 4)   # q_nope, q_rope, k_nope, k_rope, v
GRAD_NAMES = ("out", "q_nope", "q_rope", "k_nope", "k_rope", "v")

# experiments/README.md (bench_attention, interpret mode): fp32 kernels are 4e-7..5e-7 from
# the reference relative to its largest value (outputs of order 1, gradients of order 10);
# 2e-6 leaves a 4x margin. bf16: at most twice XLA's own bf16 error on the same inputs (the
# README: 7.8e-3 against XLA's 1.1e-2) plus this margin for inputs where XLA's is ~0.
FP32_RTOL = 2e-6
BF16_MARGIN = 4e-3


def make_inputs(batch, heads, length, nope, rope, v_dim, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 6)
    shapes = [(batch, heads, length, nope), (batch, heads, length, rope),
              (batch, heads, length, nope), (batch, length, rope),
              (batch, heads, length, v_dim), (batch, heads, length, v_dim)]
    return [jax.random.normal(k, s, jnp.float32).astype(dtype)
            for k, s in zip(keys, shapes, strict=True)]


def value_and_grads(attention, arrays, kv_start, scale):
    """attention output and the gradients of sum(out * dout) w.r.t. q/k/v parts (fp32)."""
    *inputs, dout = arrays

    def loss(*args):
        out = attention(*args, kv_start, scale=scale)
        return jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32)), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=GRAD_ARGS, has_aux=True))(*inputs)
    return [x.astype(jnp.float32) for x in (out, *grads)]


# backend, batch, heads, length, nope, rope, v_dim, kv_start, blocks, dtype
CASES = [
    ("gpu", 2, 3, 37, 16, 16, 24, (0, 5), FlashBlocks(16, 16, 16, 16), "float32"),  # v < qk
    ("gpu", 1, 2, 21, 8, 64, 80, (3,), FlashBlocks(32, 16, 16, 32), "float32"),     # v > qk
    ("gpu", 2, 3, 37, 16, 16, 24, (0, 5), FlashBlocks(16, 16, 16, 16), "bfloat16"),
    ("tpu", 2, 3, 29, 16, 32, 24, (0, 7), FlashBlocks(8, 16, 16, 8), "float32"),    # v < qk
    ("tpu", 1, 1, 19, 8, 16, 48, (2,), FlashBlocks(16, 8, 8, 16), "float32"),       # v > qk
    ("tpu", 1, 1, 19, 8, 16, 48, (2,), FlashBlocks(16, 8, 8, 16), "bfloat16"),
]


@pytest.mark.parametrize("backend,batch,heads,length,nope,rope,v_dim,starts,blocks,dtype",
                         CASES)
def test_values_and_gradients_match_reference(backend, batch, heads, length, nope, rope, v_dim,
                                               starts, blocks, dtype):
    dtype = jnp.dtype(dtype)
    arrays = make_inputs(batch, heads, length, nope, rope, v_dim, dtype)
    kv_start = jnp.asarray(starts, jnp.int32)
    scale = (nope + rope) ** -0.5
    kernel = lambda *a, **k: mla_flash_attention(  # noqa: E731
        *a, **k, blocks=blocks, target=KernelTarget(backend, True))
    got = value_and_grads(kernel, arrays, kv_start, scale)
    exact = value_and_grads(mla_flash_reference, [x.astype(jnp.float32) for x in arrays],
                            kv_start, scale)
    if dtype == jnp.float32:
        for name, g, e in zip(GRAD_NAMES, got, exact, strict=True):
            assert relative_error(g, e) < FP32_RTOL, name
    else:   # as close to the fp32 truth as XLA's own bf16 attention, within a margin
        xla = value_and_grads(mla_flash_reference, arrays, kv_start, scale)
        for name, g, x, e in zip(GRAD_NAMES, got, xla, exact, strict=True):
            assert relative_error(g, e) < 2 * relative_error(x, e) + BF16_MARGIN, name


def test_tpu_kernels_under_tpu_interpret_params():
    """Simulated TPU memory spaces, uninitialised (NaN) padding of partial blocks and the race
    detector; tiny because it is ~200x slower than plain interpret mode."""
    arrays = make_inputs(1, 1, 12, 8, 8, 16, jnp.float32)
    kv_start = jnp.asarray([3], jnp.int32)
    target = KernelTarget("tpu", pltpu.InterpretParams(detect_races=True))
    kernel = lambda *a, **k: mla_flash_attention(  # noqa: E731
        *a, **k, blocks=FlashBlocks(8, 8, 8, 8), target=target)
    got = value_and_grads(kernel, arrays, kv_start, 0.25)
    for g, e in zip(got, value_and_grads(mla_flash_reference, arrays, kv_start, 0.25),
                    strict=True):
        assert relative_error(g, e) < FP32_RTOL


def test_plain_causal_is_the_default_and_blocks_longer_than_the_sequence_shrink():
    arrays = make_inputs(2, 2, 9, 16, 16, 16, jnp.float32)[:5]
    got = mla_flash_attention(*arrays, scale=0.2, target=KernelTarget("gpu", True))
    want = mla_flash_reference(*arrays, jnp.zeros((2,), jnp.int32), scale=0.2)
    assert relative_error(got, want) < FP32_RTOL


def test_unsupported_head_dims_fall_back_to_xla_with_one_log_line(caplog, monkeypatch):
    """On a real GPU Triton cannot tile head dim 8 (or 24): the reference runs instead (on this
    CPU no kernel could be compiled, so a result at all shows the kernel was not called)."""
    arrays = make_inputs(1, 2, 5, 8, 24, 16, jnp.float32)[:5]
    kv_start = jnp.zeros((1,), jnp.int32)
    monkeypatch.setattr(dispatch, "_logged", set())           # log_once: a fresh record
    with caplog.at_level(logging.WARNING, logger="mythos_jax.kernels"):
        for _ in range(2):
            got = mla_flash_attention(*arrays, kv_start, scale=0.3,
                                      target=KernelTarget("gpu", False))
    np.testing.assert_array_equal(got, mla_flash_reference(*arrays, kv_start, scale=0.3))
    lines = [r.getMessage() for r in caplog.records if "falls back to XLA" in r.getMessage()]
    assert len(lines) == 1 and "{'nope': 8, 'rope': 24}" in lines[0]


@pytest.mark.parametrize("bad, match", [
    (dict(k_rope=jnp.zeros((1, 5, 4))), "k_rope must have shape"),
    (dict(v=jnp.zeros((1, 3, 5, 16))), "v must have shape"),
    (dict(kv_start=jnp.zeros((2,), jnp.int32)), "kv_start must have shape"),
])
def test_shape_errors_name_the_array(bad, match):
    names = ["q_nope", "q_rope", "k_nope", "k_rope", "v"]
    args = dict(zip(names, make_inputs(1, 2, 5, 8, 8, 16, jnp.float32)[:5], strict=True),
                kv_start=None)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        mla_flash_attention(**args, scale=1.0, target=KernelTarget("gpu", True))


def test_bad_block_sizes_raise():
    with pytest.raises(ValueError, match="FlashBlocks.block_q"):
        FlashBlocks(block_q=0)
    arrays = make_inputs(1, 1, 20, 8, 8, 8, jnp.float32)[:5]
    with pytest.raises(ValueError, match="multiple of 8"):
        mla_flash_attention(*arrays, scale=1.0, blocks=FlashBlocks(12, 12, 12, 12),
                            target=KernelTarget("tpu", True))
