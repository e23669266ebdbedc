"""The MLA kernels lower for the real backends, without the hardware: ``jax.export`` to CUDA
(Pallas -> Triton IR) and to TPU (Pallas -> Mosaic), forward, backward and decode, at the MLA
dims of DeepSeek-V3 and mythos_1b in bf16. This checks what lowering checks (Triton's
power-of-two tiles, supported primitives, block shapes); it compiles and runs nothing."""

import contextlib

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from mythos_jax.kernels import KernelTarget, mla_flash_attention
from mythos_jax.kernels.mla_decode import mla_decode_attention

PLATFORMS = {"gpu": "cuda", "tpu": "tpu"}
CUSTOM_CALLS = ("__gpu$xla.gpu.triton", "tpu_custom_call")
# name: (heads, nope, rope, v_dim, kv_lora)
DIMS = {"deepseek_v3": (4, 128, 64, 128, 512), "mythos_1b": (4, 64, 32, 64, 256)}


def _export(fn, args, backend: str) -> str:
    """Lower ``fn`` for the backend's platform; the MLIR text."""
    context = contextlib.nullcontext()
    if backend == "gpu":   # no GPU here: name one for Triton's compute-capability lookup
        device = AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="cuda")
        mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=device)
        context = jax.sharding.use_abstract_mesh(mesh)
    checks = [jax.export.DisabledSafetyCheck.custom_call(name) for name in CUSTOM_CALLS]
    with context:
        exported = jax.export.export(jax.jit(fn), platforms=[PLATFORMS[backend]],
                                     disabled_checks=checks)(*args)
    return exported.mlir_module()


@pytest.mark.parametrize("dims", sorted(DIMS))
@pytest.mark.parametrize("backend", sorted(PLATFORMS))
def test_flash_forward_and_backward_lower(backend, dims):
    heads, nope, rope, v_dim, _ = DIMS[dims]
    batch, length = 1, 300     # not a multiple of any block: masked tails
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    args = [spec(batch, heads, length, nope), spec(batch, heads, length, rope),
            spec(batch, heads, length, nope), spec(batch, length, rope),
            spec(batch, heads, length, v_dim), jax.ShapeDtypeStruct((batch,), jnp.int32)]
    target = KernelTarget(backend, False)

    def loss(*inputs):
        out = mla_flash_attention(*inputs, scale=0.1, target=target)
        return jnp.sum(out.astype(jnp.float32))
    text = _export(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), args, backend)
    names = ("mla_flash_forward", "mla_flash_dq", "mla_flash_dkv")
    assert all(name in text for name in names)


@pytest.mark.parametrize("backend", sorted(PLATFORMS))
def test_decode_lowers(backend):
    heads, _, rope, _, latent = DIMS["deepseek_v3"]
    batch, length = 2, 1000
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    index = jax.ShapeDtypeStruct((batch,), jnp.int32)
    args = [spec(batch, heads, latent), spec(batch, heads, rope), spec(batch, length, latent),
            spec(batch, length, rope), index, index]
    text = _export(lambda *a: mla_decode_attention(*a, scale=0.1,
                                                   target=KernelTarget(backend, False)),
                   args, backend)
    assert "mla_decode" in text
