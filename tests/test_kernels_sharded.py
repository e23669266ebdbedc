"""The Pallas kernels under a mesh (8 fake CPU devices, interpret mode) run per shard inside
``jax.shard_map``: batch over the data-like axes, heads over "tensor". A sharded training step
of the tiny model with ``attention_impl="pallas"`` gives the logits and parameter gradients of
the single-device "xla" step, and the compiled program runs every kernel on its local shard
and gathers none of their inputs (without the shard_map, XLA gathers them to the global
batch on every device). The kernel-level tests check k_rope's gradient with heads split over
"tensor" (Auto and Explicit meshes), the decode kernel, and that the real Triton / Mosaic
kernels lower per shard for an 8-device GPU / TPU mesh, each split by the ``spec`` it is
given (on the (2, 2, 2, 1) meshes: batch over data x fsdp, heads over tensor)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

from mythos_jax import OpenMythos, variants
from mythos_jax.kernels import (KernelTarget, mla_decode_attention, mla_decode_reference,
                                mla_flash_attention, mla_flash_reference)
from mythos_jax.parallel import MESH_AXES, make_mesh, state_shardings

N_LOOPS = 2
BATCH, LENGTH = 8, 11
BATCH_HEADS = P(("data", "fsdp"), "tensor")       # the (B, H) split the kernel tests give
_COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|all-to-all|collective-permute|"
                         r"reduce-scatter)(-start)?\(")


def _loss(graphdef, params, rest, ids):
    logits = nnx.merge(graphdef, params, rest)(ids, N_LOOPS)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits


def _split(impl):
    """(graphdef, params, rest) of the tiny MLA model with attention ``impl``."""
    model = OpenMythos(variants.tiny_mla(attention_impl=impl, act_threshold=50.0),
                       rngs=nnx.Rngs(0))
    return nnx.split(model, nnx.Param, ...)


def _kernel_instructions(hlo: str, kernel: str) -> list[str]:
    """The compiled HLO instructions that come from the Pallas kernel named ``kernel``."""
    return [line for line in hlo.splitlines()
            if re.search(rf'op_name="[^"]*\b{kernel}\b', line)]


def assert_runs_per_shard(hlo: str, kernels, global_batch: int,
                          local_shape: str | None = None) -> None:
    """No collective in the compiled ``hlo`` yields a (3-D or 4-D) array of the global batch
    (XLA gathers none of the kernels' inputs), and each kernel is in it, never holds such an
    array, and holds one of ``local_shape`` (e.g. "f32[1,4,11,8]": local batch and heads) if
    given. (XLA's own gathers carry no op_name, so they cannot be traced to a kernel.)"""
    global_array = re.compile(rf"f32\[{global_batch},\d+,\d+(,\d+)?\]")
    gathered = [line for line in hlo.splitlines()
                if _COLLECTIVE.search(line) and global_array.search(line)]
    assert not gathered, gathered[0]
    for kernel in kernels:
        lines = "\n".join(_kernel_instructions(hlo, kernel))
        assert lines, f"{kernel} is not in the compiled program"
        assert not global_array.search(lines), kernel
        assert local_shape is None or local_shape in lines, kernel


@pytest.fixture(scope="module")
def single_device_xla():
    """Loss, logits and parameter gradients of the single-device "xla" step."""
    graphdef, params, rest = _split("xla")
    ids = jax.random.randint(jax.random.key(1), (BATCH, LENGTH), 0, 256)
    step = jax.jit(jax.value_and_grad(lambda p, r, i: _loss(graphdef, p, r, i), has_aux=True))
    return ids, step(params, rest, ids)


@pytest.mark.parametrize("spec, local_shape", [
    ("data=8", f"f32[1,4,{LENGTH},8]"),                    # batch 8 / 8, all 4 heads
    ("data=2,fsdp=2,tensor=2", f"f32[2,2,{LENGTH},8]"),    # batch 8 / 4, heads 4 / 2
])
def test_sharded_step_equals_single_device_xla(single_device_xla, spec, local_shape):
    ids, ((loss, logits), grads) = single_device_xla
    graphdef, params, rest = _split("pallas")
    mesh = make_mesh(spec)
    param_shardings, rest_shardings = state_shardings(params, mesh), state_shardings(rest, mesh)
    batch = NamedSharding(mesh, P(("data", "fsdp", "expert")))
    step = jax.jit(jax.value_and_grad(lambda p, r, i: _loss(graphdef, p, r, i), has_aux=True),
                   in_shardings=(param_shardings, rest_shardings, batch),
                   out_shardings=((NamedSharding(mesh, P()), batch), param_shardings))
    with jax.set_mesh(mesh):
        args = (jax.device_put(params, param_shardings), jax.device_put(rest, rest_shardings),
                jax.device_put(ids, batch))
        compiled = step.lower(*args).compile()
        (s_loss, s_logits), s_grads = compiled(*args)
    np.testing.assert_allclose(s_logits, logits, atol=1e-5)
    np.testing.assert_allclose(s_loss, loss, atol=1e-5)
    for ours, theirs in zip(jax.tree.leaves(s_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert_runs_per_shard(compiled.as_text(),
                          ("mla_flash_forward", "mla_flash_dq", "mla_flash_dkv"), BATCH,
                          local_shape)


def _normal(key, *shapes):
    return [jax.random.normal(k, shape) for k, shape in zip(jax.random.split(key, len(shapes)),
                                                              shapes)]


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_flash_gradients_with_heads_over_tensor(axis_type):
    """k_rope is shared by the heads split over "tensor": its gradient sums over them. On an
    Explicit mesh the inputs are resharded to the kernel's specs first."""
    arrays = _normal(jax.random.key(2), (4, 4, 9, 8), (4, 4, 9, 8), (4, 4, 9, 8), (4, 9, 8),
                     (4, 4, 9, 16))                  # q_nope, q_rope, k_nope, k_rope, v
    kv_start = jnp.asarray([0, 3, 5, 0], jnp.int32)

    def value_and_grads(attention, **spec):
        def loss(*inputs):
            return jnp.sum(jnp.sin(attention(*inputs, kv_start, scale=0.25, **spec)))
        return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(arrays)))))

    expected = value_and_grads(mla_flash_reference)(*arrays)
    mesh = jax.make_mesh((2, 2, 2, 1), MESH_AXES, axis_types=(axis_type,) * len(MESH_AXES))
    with jax.set_mesh(mesh):
        arrays = jax.device_put(arrays, NamedSharding(mesh, P("data")))
        compiled = value_and_grads(mla_flash_attention, spec=BATCH_HEADS).lower(*arrays).compile()
        value, grads = compiled(*arrays)
    np.testing.assert_allclose(value, expected[0], rtol=1e-5)
    for ours, theirs in zip(grads, expected[1], strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert_runs_per_shard(compiled.as_text(),
                          ("mla_flash_forward", "mla_flash_dq", "mla_flash_dkv"), 4,
                          "f32[1,2,9,8]")


def test_decode_per_shard_equals_reference():
    q_latent, q_rope, c_kv, k_rope = _normal(jax.random.key(3), (4, 4, 16), (4, 4, 8),
                                             (4, 12, 16), (4, 12, 8))
    kv_start = jnp.asarray([0, 2, 7, 0], jnp.int32)
    kv_end = jnp.asarray([12, 9, 8, 5], jnp.int32)
    arrays = (q_latent, q_rope, c_kv, k_rope, kv_start, kv_end)
    expected = mla_decode_reference(*arrays, scale=0.25)
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    decode = jax.jit(lambda *a: mla_decode_attention(*a, scale=0.25, spec=BATCH_HEADS))
    with jax.set_mesh(mesh):
        compiled = decode.lower(*arrays).compile()
        out = compiled(*arrays)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    # The decode kernel pads its head tiles, so no operand keeps the local (1, 2, 16) shape.
    assert_runs_per_shard(compiled.as_text(), ("mla_decode",), 4)


@pytest.mark.parametrize("platform, device_kind, custom_call", [
    ("cuda", "NVIDIA H200", "__gpu$xla.gpu.triton"), ("tpu", "TPU v5p", "tpu_custom_call")])
def test_real_backends_lower_per_shard(platform, device_kind, custom_call):
    """Lowered for an 8-device H200 / TPU mesh (no hardware): every Triton / Mosaic custom
    call of the forward and backward takes the local batch of 2 (8 over data x fsdp)."""
    device = AbstractDevice(device_kind=device_kind, num_cores=None, platform=platform)
    mesh = AbstractMesh((2, 2, 2, 1), MESH_AXES, (AxisType.Auto,) * len(MESH_AXES),
                        abstract_device=device)
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    args = [spec(8, 4, 300, 64), spec(8, 4, 300, 32), spec(8, 4, 300, 64), spec(8, 300, 32),
            spec(8, 4, 300, 64), jax.ShapeDtypeStruct((8,), jnp.int32)]
    target = KernelTarget("gpu" if platform == "cuda" else "tpu", False)

    def loss(*inputs):
        return jnp.sum(mla_flash_attention(*inputs, scale=0.1, spec=BATCH_HEADS, target=target))
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.export.export(
            jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))), platforms=[platform],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(custom_call)],
        )(*args).mlir_module()
    calls = [line for line in text.splitlines() if f"custom_call @{custom_call}" in line]
    assert len(calls) == 3                                  # forward, dq, dk/dv
    for call in calls:
        operand_types = call.rsplit(" : (", 1)[1]
        assert set(re.findall(r"tensor<(\d+)x", operand_types)) == {"2"}, operand_types
