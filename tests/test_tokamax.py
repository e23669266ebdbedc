"""The tokamax integration on CPU: ``attention_impl="tokamax"`` (``kernels.tokamax_attention``)
and the dropless MoE's grouped matmul (``moe.grouped_matmul``).

tokamax's XLA implementations run here against our references (values and gradients; MLA
dims, odd dims, causal and left padding); its Mosaic GPU kernels (forward and backward) and
the TPU grouped matmuls are lowered with ``jax.export`` for CUDA / TPU without the hardware
(tokamax's own ``cross_compile`` option, and its sm90 check answered yes), which checks the
shapes, masks and dtypes they accept but compiles and runs nothing. The choice per platform
and the fallbacks (one log line each) are checked on abstract meshes that name a device.
tokamax is imported unguarded: without it (it is in requirements-test.txt) this file fails.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokamax
from jax.sharding import AbstractDevice, AbstractMesh, AxisType
from tokamax._src import gpu_utils

from mythos_jax.kernels import dispatch, mla_flash_attention, mla_flash_reference
from mythos_jax.kernels import tokamax_attention
from mythos_jax.moe import grouped_matmul as gm
from mythos_jax.moe.expert_ffn import ragged_swiglu

PLATFORM = {"cpu": "cpu", "NVIDIA H200": "cuda", "NVIDIA A100-SXM4-80GB": "cuda", "TPU v5p": "tpu",
            "TPU v4": "tpu", "TPU7x": "tpu"}
CUSTOM_CALLS = ("mosaic_gpu_v2", "tpu_custom_call", "__gpu$xla.gpu.triton")
# name: (nope, rope, v_dim)
MLA_DIMS = {"deepseek_v3": (128, 64, 128), "mythos_1b": (64, 32, 64), "odd": (24, 7, 13)}


def device_mesh(device_kind: str) -> AbstractMesh:
    device = AbstractDevice(device_kind=device_kind, num_cores=1, platform=PLATFORM[device_kind])
    return AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=device)


def export_text(fn, args, device_kind: str) -> str:
    """MLIR of ``fn`` lowered for ``device_kind``'s platform under its abstract mesh."""
    checks = [jax.export.DisabledSafetyCheck.custom_call(name) for name in CUSTOM_CALLS]
    with tokamax.config.cross_compile(True), jax.sharding.use_abstract_mesh(
            device_mesh(device_kind)):
        return jax.export.export(jax.jit(fn), platforms=[PLATFORM[device_kind]],
                                 disabled_checks=checks)(*args).mlir_module()


@pytest.fixture
def hopper(monkeypatch):
    """tokamax's compute-capability checks answer "sm90" (no GPU here)."""
    monkeypatch.setattr(gpu_utils, "is_sm80", lambda device=None: False)
    monkeypatch.setattr(gpu_utils, "is_sm90", lambda device=None: True)
    monkeypatch.setattr(gpu_utils, "is_sm100", lambda device=None: False)


@pytest.fixture
def xla_implementations(monkeypatch):
    """tokamax's XLA implementations even on a GPU/TPU (``device_check.py`` runs this file
    there): the platform the adapters see is "cpu". A no-op on this CPU."""
    from mythos_jax.kernels import mla_flash
    for module in (mla_flash, gm):
        monkeypatch.setattr(module, "mesh_platform", lambda mesh=None: "cpu")


@pytest.fixture
def fresh_log(monkeypatch, caplog):
    """The log lines of ``dispatch.log_once`` from here on (its memory emptied)."""
    monkeypatch.setattr(dispatch, "_logged", set())
    caplog.set_level(logging.WARNING, logger="mythos_jax.kernels")
    return lambda: [record.getMessage() for record in caplog.records]


def without_tokamax(monkeypatch):
    monkeypatch.setattr(tokamax_attention, "import_tokamax",
                        lambda: (None, "tokamax is not installed (test)"))


def mla_inputs(dims, batch=2, heads=2, length=33, dtype=jnp.float32):
    nope, rope, v_dim = dims
    keys = jax.random.split(jax.random.key(0), 5)
    shapes = [(batch, heads, length, nope), (batch, heads, length, rope),
              (batch, heads, length, nope), (batch, length, rope), (batch, heads, length, v_dim)]
    return [jax.random.normal(k, s, dtype) for k, s in zip(keys, shapes)]


# ------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("dims", ["deepseek_v3", "odd"])
@pytest.mark.parametrize("kv_start", [None, (0, 9)], ids=["causal", "left_padding"])
def test_tokamax_xla_matches_reference_values_and_gradients(dims, kv_start, monkeypatch,
                                                            xla_implementations):
    calls = []
    real = tokamax_attention.tokamax_mla_attention
    monkeypatch.setattr(tokamax_attention, "tokamax_mla_attention",
                        lambda *a, **k: calls.append(k["implementation"]) or real(*a, **k))
    inputs = mla_inputs(MLA_DIMS[dims])
    start = None if kv_start is None else jnp.asarray(kv_start, jnp.int32)
    reference_start = jnp.zeros((2,), jnp.int32) if start is None else start

    def loss(attention):
        return lambda *arrays: jnp.sum(jnp.sin(attention(*arrays)))
    ours = lambda *a: mla_flash_attention(*a, start, scale=0.2, tokamax=True)  # noqa: E731
    ref = lambda *a: mla_flash_reference(*a, reference_start, scale=0.2)       # noqa: E731
    np.testing.assert_allclose(jax.jit(ours)(*inputs), jax.jit(ref)(*inputs), atol=2e-5)
    grads = jax.jit(jax.grad(loss(ours), argnums=range(5)))(*inputs)
    for got, want in zip(grads, jax.jit(jax.grad(loss(ref), argnums=range(5)))(*inputs)):
        np.testing.assert_allclose(got, want, atol=5e-5)
    assert calls and set(calls) == {"xla"}          # tokamax ran, its XLA implementation


@pytest.mark.parametrize("dims", ["deepseek_v3", "mythos_1b"])
def test_mosaic_gpu_forward_and_backward_lower_for_cuda(dims, hopper):
    """bf16 MLA (q/k dim != v dim) with left padding lowers to tokamax's Mosaic GPU kernels
    and no Triton kernel; the gradients keep the inputs' shapes."""
    batch, heads, length = 1, 4, 300      # not a multiple of the 64-row blocks
    shapes = [np.shape(x) for x in mla_inputs(MLA_DIMS[dims], batch, heads, length)]
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]
    args.append(jax.ShapeDtypeStruct((batch,), jnp.int32))

    def loss(*arrays):
        out = mla_flash_attention(*arrays, scale=0.1, tokamax=True)
        return jnp.sum(out.astype(jnp.float32))
    text = export_text(jax.grad(loss, argnums=range(5)), args, "NVIDIA H200")
    assert text.count("mosaic_gpu_v2") >= 2 and "triton" not in text
    with tokamax.config.cross_compile(True), jax.sharding.use_abstract_mesh(
            device_mesh("NVIDIA H200")):
        grads = jax.eval_shape(jax.grad(loss, argnums=range(5)), *args)
    assert [g.shape for g in grads] == shapes


def test_auto_attention_per_platform(monkeypatch, fresh_log):
    auto = lambda kind: dispatch.resolve_attention_impl("auto", device_mesh(kind))  # noqa: E731
    assert auto("NVIDIA H200") == "tokamax"
    assert [auto(kind) for kind in ("NVIDIA A100-SXM4-80GB", "TPU v5p", "TPU v4")] == [
        "pallas"] * 3
    assert auto("cpu") == "xla"
    assert dispatch.resolve_attention_impl("tokamax") == "tokamax"
    without_tokamax(monkeypatch)
    assert auto("NVIDIA H200") == "pallas" and auto("NVIDIA H200") == "pallas"
    assert [line for line in fresh_log() if "not tokamax" in line] == [
        "attention_impl='auto' runs the Pallas Triton kernels, not tokamax: tokamax Mosaic GPU "
        "needs a Hopper or Blackwell GPU, got 'NVIDIA A100-SXM4-80GB'",
        "attention_impl='auto' runs the Pallas Triton kernels, not tokamax: "
        "tokamax is not installed (test)"]


@pytest.mark.parametrize("case", ["fp32", "head_dim", "platform", "missing"])
def test_tokamax_falls_back_to_our_kernels_with_one_log_line(case, monkeypatch, fresh_log):
    dtype, dims, kind = jnp.bfloat16, MLA_DIMS["deepseek_v3"], "NVIDIA H200"
    if case == "fp32":
        dtype, reason = jnp.float32, "dtype float32 on tokamax Mosaic GPU"
    if case == "head_dim":
        dims, reason = (256, 64, 128), "head dims {'qk': 320} > 256"
    if case == "platform":
        kind, reason = "TPU v4", "needs TPU v5 or later, got 'TPU v4'"
    if case == "missing":
        without_tokamax(monkeypatch)
        reason = "tokamax is not installed"
    inputs = mla_inputs(dims, length=16, dtype=dtype)
    with jax.sharding.use_abstract_mesh(device_mesh(kind)):
        for _ in range(2):
            jaxpr = str(jax.make_jaxpr(
                lambda *a: mla_flash_attention(*a, scale=0.1, tokamax=True))(*inputs))
    assert "pallas_call" in jaxpr and "mla_flash_forward" in jaxpr     # our kernel
    lines = [line for line in fresh_log() if "not tokamax" in line]
    assert len(lines) == 1 and reason in lines[0], lines


# ------------------------------------------------------------------------ grouped matmul
def moe_inputs(dtype=jnp.float32):
    """rows (M, D) sorted by expert with an empty group and 3 rows past the groups, stacked
    SwiGLU kernels for 4 experts."""
    keys = jax.random.split(jax.random.key(1), 4)
    rows = jax.random.normal(keys[0], (30, 16), dtype)
    gate, up = (jax.random.normal(k, (4, 16, 24), dtype) / 4 for k in keys[1:3])
    down = jax.random.normal(keys[3], (4, 24, 16), dtype) / 4
    return rows, jnp.array([9, 0, 13, 5], jnp.int32), gate, up, down


def test_tokamax_ragged_dot_matches_lax_values_and_gradients(xla_implementations):
    rows, sizes, gate, up, down = moe_inputs()

    def loss(choice):
        return lambda *a: jnp.sum(jnp.sin(ragged_swiglu(a[0], sizes, *a[1:],
                                                        grouped_matmul=choice)))
    run = jax.jit(ragged_swiglu, static_argnames="grouped_matmul")
    ours = run(rows, sizes, gate, up, down, grouped_matmul="tokamax")
    np.testing.assert_allclose(
        ours, run(rows, sizes, gate, up, down, grouped_matmul="ragged_dot"), atol=1e-5)
    assert not np.any(np.asarray(ours[27:]))                 # rows past the groups give 0
    grads = {choice: jax.jit(jax.grad(loss(choice), range(4)))(rows, gate, up, down)
             for choice in ("tokamax", "ragged_dot")}
    for got, want in zip(grads["tokamax"], grads["ragged_dot"]):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_grouped_matmul_table_per_platform(monkeypatch):
    bf16, fp32 = jnp.bfloat16, jnp.float32
    assert gm.auto_choice("gpu", "NVIDIA H200", bf16) == "tokamax"
    assert gm.auto_choice("gpu", "NVIDIA H200", fp32) == "ragged_dot"
    assert gm.auto_choice("tpu", "TPU v5p", fp32) == "tokamax"
    assert gm.auto_choice("tpu", "TPU7x", bf16) == "tokamax"
    assert gm.auto_choice("tpu", "TPU v4", bf16) == "megablox"
    assert gm.auto_choice("cpu", "cpu", bf16) == "ragged_dot"
    assert gm.auto_choice("tpu", "TPU v5p", bf16, partitioned=True) == "ragged_dot"
    with jax.sharding.use_abstract_mesh(device_mesh("cpu")):
        assert gm.resolve("auto", bf16) == "ragged_dot"
    with jax.sharding.use_abstract_mesh(device_mesh("TPU v5p")):
        assert gm.resolve("auto", bf16) == "tokamax" and gm.is_pallas("auto", bf16)
    assert set(gm.TABLE.values()) <= set(gm.GroupedMatmul.names())


def test_grouped_matmul_without_tokamax_falls_back_with_one_log_line(monkeypatch, fresh_log):
    without_tokamax(monkeypatch)
    monkeypatch.setattr(gm, "import_tokamax", tokamax_attention.import_tokamax)
    assert gm.auto_choice("gpu", "NVIDIA H200", jnp.bfloat16) == "ragged_dot"
    assert gm.auto_choice("tpu", "TPU v5p", jnp.bfloat16) == "megablox"
    with jax.sharding.use_abstract_mesh(device_mesh("cpu")):
        assert gm.resolve("tokamax", jnp.bfloat16) == "ragged_dot"
    assert [line for line in fresh_log() if "not tokamax" in line] == [
        "grouped matmul ragged_dot, not tokamax: tokamax is not installed (test)",
        "grouped matmul megablox, not tokamax: tokamax is not installed (test)"]


@pytest.mark.parametrize("kind, kernel", [("NVIDIA H200", "mosaic_gpu_v2"),
                                          ("TPU v5p", "tpu_custom_call"),
                                          ("TPU v4", "tpu_custom_call")])
def test_gpu_and_tpu_grouped_matmuls_lower(kind, kernel, hopper, monkeypatch):
    """The auto choice of each device lowers, forward and backward, in bf16: every grouped
    matmul a kernel (no ``ragged_dot`` op left to XLA)."""
    chosen = []
    monkeypatch.setattr(gm, "_MATMULS", {name: (lambda f, n: lambda *a: chosen.append(n)
                                                or f(*a))(fn, name)
                                         for name, fn in gm._MATMULS.items()})
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    # (Mosaic GPU's tiles need model-sized dims: at D=16 its lowering fails.)
    args = [spec(512, 256), spec(8, 256, 384), spec(8, 256, 384), spec(8, 384, 256),
            jax.ShapeDtypeStruct((8,), jnp.int32)]

    def loss(rows, gate, up, down, sizes):
        return jnp.sum(ragged_swiglu(rows, sizes, gate, up, down).astype(jnp.float32))
    text = export_text(jax.grad(loss, argnums=range(4)), args, kind)
    assert kernel in text and '"chlo.ragged_dot"' not in text     # no XLA grouped matmul
    assert set(chosen) == {"megablox" if kind == "TPU v4" else "tokamax"}


def test_dropless_dispatch_runs_tokamax_on_cpu(xla_implementations):
    """``moe_impl="dropless"`` with ``grouped_matmul="tokamax"`` equals the dense reference."""
    from mythos_jax.moe.dispatch import dispatch
    keys = jax.random.split(jax.random.key(2), 3)
    _, _, gate, up, down = moe_inputs()
    x = jax.random.normal(keys[0], (12, 16))
    ids = jax.random.randint(keys[1], (12, 2), 0, 4)
    weights = jax.random.uniform(keys[2], (12, 2))
    got, _ = dispatch("dropless", x, ids, weights, gate, up, down, grouped_matmul="tokamax")
    want, _ = dispatch("dense", x, ids, weights, gate, up, down)
    np.testing.assert_allclose(got, want, atol=1e-5)


# ------------------------------------------------------------------------------ in the model
def test_model_with_tokamax_attention_equals_xla(monkeypatch, xla_implementations):
    """``attention_impl="tokamax"``: the same logits as "xla" (tokamax's XLA implementation
    through ``MLAttention``; its gradients are checked above, at the attention level), and
    one-token decode over a cache stays on the einsums (no tokamax call)."""
    from flax import nnx

    from mythos_jax import OpenMythos, variants
    from mythos_jax.inference.cache import init_cache

    calls = []
    real = tokamax_attention.tokamax_mla_attention
    monkeypatch.setattr(tokamax_attention, "tokamax_mla_attention",
                        lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    models = [OpenMythos(variants.tiny_mla(attention_impl=impl, act_threshold=50.0),
                         rngs=nnx.Rngs(0)) for impl in ("xla", "tokamax")]
    ids = jax.random.randint(jax.random.key(1), (2, 11), 0, 256)

    forward = nnx.jit(lambda model: model(ids, 2))
    xla_logits, tk_logits = forward(models[0]), forward(models[1])
    assert calls                                                  # tokamax ran in the model
    np.testing.assert_allclose(tk_logits, xla_logits, atol=1e-5)
    calls.clear()
    cache = init_cache(models[1].cfg, 2, 12, 2, jnp.zeros((2,), jnp.int32))
    prefilled = jax.eval_shape(lambda c: models[1](ids[:, :10], 2, cache=c).cache, cache)
    calls.clear()
    jax.eval_shape(lambda c: models[1](ids[:, 10:], 2, cache=c), prefilled)
    assert not calls                                              # decode: the einsums
