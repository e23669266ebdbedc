"""The loop's decay A stays strictly inside (0, 1): ``LTIInjection.get_A`` (OpenMythos,
``A = exp(-exp(clip(log_dt + log_A, -20, 20)))``) and ``ParcaeInjection.get_A`` (Parcae,
``A = exp(-softplus(dt_bias) * exp(A_log))``), for any finite parameter values, in fp32 and
with a bfloat16 model; plus Parcae's init (A = 0.447, B = I). The "free" injection
(``FreeInjection``, E3's unstable baseline) is the opposite: its A may leave (-1, 1)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import assume, given, settings, strategies as st

from mythos_jax import OpenMythos, variants
from mythos_jax.layers.recurrence import (FreeInjection, LTIInjection, ParcaeInjection,
                                          RecurrentBlock, strictly_inside_unit)

DIM = 8
F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).tiny)            # smallest normal fp32
F32_DENORM = float(np.finfo(np.float32).smallest_subnormal)

# Values where exp(-exp(.)) or softplus rounds, saturates or overflows in fp32.
EXTREMES = [0.0, -0.0, 1e4, -1e4, 30.0, -30.0, 20.0, -20.0, 17.5, -17.5, 4.5, -4.5, 88.7,
            -88.7, 89.0, 104.0, -104.0, 200.0, -200.0, 1e-30, -1e-30, F32_TINY, -F32_TINY,
            F32_DENORM, -F32_DENORM, 1e38, -1e38, F32_MAX, -F32_MAX]

finite32 = st.one_of(st.sampled_from(EXTREMES),
                     st.floats(allow_nan=False, allow_infinity=False, width=32))
vector = st.lists(finite32, min_size=DIM, max_size=DIM)
PROPERTY = settings(max_examples=200, deadline=None)


def f32(values) -> jax.Array:
    return jnp.asarray(np.asarray(values, np.float32))


def assert_strictly_inside(a: jax.Array) -> None:
    assert a.dtype == jnp.float32 and a.ndim == 1
    a = np.asarray(a)
    assert np.all(np.isfinite(a)), a
    assert np.all(a > 0.0) and np.all(a < 1.0), a


def lti(log_A, log_dt) -> LTIInjection:
    m = LTIInjection(DIM)
    m.log_A[...] = f32(log_A)
    m.log_dt[...] = f32([log_dt])
    return m


def parcae(A_log, dt_bias) -> ParcaeInjection:
    m = ParcaeInjection(DIM)
    m.A_log[...] = f32(A_log)
    m.dt_bias[...] = f32(dt_bias)
    return m


@functools.lru_cache(maxsize=None)
def bf16_injection(kind: str):
    """The injection module as a bfloat16 model builds it (``RecurrentBlock`` of a
    ``dtype="bfloat16"`` config); built once, its parameters overwritten per example."""
    cfg = variants.tiny_mla(dim=DIM * 8, dtype="bfloat16", injection=kind)
    return RecurrentBlock(cfg, rngs=nnx.Rngs(0)).injection


def bf16_values(values, size: int | None = None) -> jax.Array:
    """Values as a bfloat16 training run would hold them: rounded to bf16, fp32 storage;
    tiled to ``size`` channels when given."""
    x = f32(values) if size is None else jnp.resize(f32(values), (size,))
    x = jnp.asarray(x, jnp.bfloat16)
    assume(bool(jnp.all(jnp.isfinite(x))))             # fp32 max rounds to inf in bf16
    return x.astype(jnp.float32)


# ---------------------------------------------------------------------------- properties
@PROPERTY
@given(log_A=vector, log_dt=finite32)
def test_lti_A_strictly_inside_unit_fp32(log_A, log_dt):
    assert_strictly_inside(lti(log_A, log_dt).get_A())


@PROPERTY
@given(A_log=vector, dt_bias=vector)
def test_parcae_A_strictly_inside_unit_fp32(A_log, dt_bias):
    assert_strictly_inside(parcae(A_log, dt_bias).get_A())


@PROPERTY
@given(log_A=vector, log_dt=finite32)
def test_lti_A_strictly_inside_unit_bf16_model(log_A, log_dt):
    m = bf16_injection("openmythos")
    m.log_A[...] = bf16_values(log_A, m.log_A.shape[0])
    m.log_dt[...] = bf16_values([log_dt])
    assert_strictly_inside(m.get_A())
    # parameters held in bfloat16 themselves (e.g. a model cast wholesale): A is still fp32
    m16 = LTIInjection(DIM)
    m16.log_A = nnx.Param(bf16_values(log_A).astype(jnp.bfloat16))
    m16.log_dt = nnx.Param(bf16_values([log_dt]).astype(jnp.bfloat16))
    assert_strictly_inside(m16.get_A())


@PROPERTY
@given(A_log=vector, dt_bias=vector)
def test_parcae_A_strictly_inside_unit_bf16_model(A_log, dt_bias):
    m = bf16_injection("parcae")
    m.A_log[...] = bf16_values(A_log, m.A_log.shape[0])
    m.dt_bias[...] = bf16_values(dt_bias, m.dt_bias.shape[0])
    assert_strictly_inside(m.get_A())
    m16 = ParcaeInjection(DIM)
    m16.A_log = nnx.Param(bf16_values(A_log).astype(jnp.bfloat16))
    m16.dt_bias = nnx.Param(bf16_values(dt_bias).astype(jnp.bfloat16))
    assert_strictly_inside(m16.get_A())


# ---------------------------------------------------------------------------- why the clip
def test_raw_openmythos_formula_rounds_to_the_boundary_in_fp32():
    """exp(-exp(x)) is exactly 1.0 at x = -20 (exp(-2e-9) rounds to 1) and exactly 0.0 at
    x = 20 (exp(-4.9e8) underflows): A = 1 never forgets, A = 0 cuts the recurrence."""
    raw = jnp.exp(-jnp.exp(jnp.array([-20.0, 20.0], jnp.float32)))
    assert raw.dtype == jnp.float32
    assert float(raw[0]) == 1.0 and float(raw[1]) == 0.0
    a = lti([-20.0] * (DIM // 2) + [20.0] * (DIM // 2), 0.0).get_A()
    assert_strictly_inside(a)
    assert float(a[0]) == np.float32(1.0 - 2.0 ** -24) and float(a[-1]) == F32_TINY


moderate = st.floats(min_value=-16.0, max_value=4.0, allow_nan=False, width=32)


@PROPERTY
@given(log_A=st.lists(moderate, min_size=DIM, max_size=DIM),
       log_dt=st.floats(min_value=-0.0, max_value=0.0, width=32))
def test_lti_clip_leaves_moderate_values_bit_exact(log_A, log_dt):
    """log_dt + log_A in [-16, 4]: get_A is OpenMythos's raw formula, bit for bit (parity)."""
    raw = jnp.exp(-jnp.exp(f32([log_dt]) + f32(log_A)))
    np.testing.assert_array_equal(np.asarray(lti(log_A, log_dt).get_A()), np.asarray(raw))
    np.testing.assert_array_equal(np.asarray(strictly_inside_unit(raw)), np.asarray(raw))


@PROPERTY
@given(A_log=st.lists(st.floats(min_value=-8.0, max_value=2.0, width=32),
                      min_size=DIM, max_size=DIM),
       dt_bias=st.lists(st.floats(min_value=-8.0, max_value=2.0, width=32),
                        min_size=DIM, max_size=DIM))
def test_parcae_clip_leaves_moderate_values_bit_exact(A_log, dt_bias):
    raw = jnp.exp(-jax.nn.softplus(f32(dt_bias)) * jnp.exp(f32(A_log)))
    assume(bool(jnp.all((raw > 0) & (raw < 1))))
    np.testing.assert_array_equal(np.asarray(parcae(A_log, dt_bias).get_A()), np.asarray(raw))


# ---------------------------------------------------------------------------- Parcae init
def test_parcae_init():
    m = ParcaeInjection(DIM)
    np.testing.assert_allclose(np.asarray(m.get_A()), np.full(DIM, 0.447), atol=1e-3)
    np.testing.assert_array_equal(np.asarray(m.B[...]), np.eye(DIM, dtype=np.float32))
    # h = 0: u = A*0 + dt * (e @ I.T) = softplus(dt_bias) * e
    e = jax.random.normal(jax.random.key(0), (2, 3, DIM), jnp.float32)
    out = m(jnp.zeros_like(e), e)
    dt = jax.nn.softplus(m.dt_bias[...])
    np.testing.assert_allclose(np.asarray(out), np.asarray(dt * e), rtol=1e-6, atol=0)
    # and dt = -ln(0.447) at init, so that A = exp(-dt * exp(0)) = 0.447
    np.testing.assert_allclose(np.asarray(dt), -np.log(0.447), rtol=1e-6)


# ---------------------------------------------------------------------------- free (E3)
def test_free_injection_is_A_h_plus_e_B_transposed_plus_u_from_A_1_B_tenth_identity():
    m = FreeInjection(DIM)
    np.testing.assert_array_equal(np.asarray(m.get_A()), np.ones(DIM, np.float32))
    np.testing.assert_array_equal(np.asarray(m.B[...]), 0.1 * np.eye(DIM, dtype=np.float32))
    m.A[...] = jax.random.normal(jax.random.key(1), (DIM,))
    m.B[...] = jax.random.normal(jax.random.key(2), (DIM, DIM))
    h, e, u = (jax.random.normal(jax.random.key(i), (2, 3, DIM), jnp.float32) for i in range(3))
    expected = (np.asarray(m.A[...]) * np.asarray(h) + np.asarray(e) @ np.asarray(m.B[...]).T
                + np.asarray(u))
    np.testing.assert_allclose(np.asarray(m(h, e, u)), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(m.get_A()), np.asarray(m.A[...]))


def test_free_rho_crosses_1_when_set_and_after_one_gradient_step():
    m = FreeInjection(DIM)
    m.A[...] = f32([0.5] * (DIM - 1) + [-1.5])
    assert float(jnp.max(jnp.abs(m.get_A()))) == 1.5          # rho(A) = max |A_i|, sign apart
    m = FreeInjection(DIM)
    h = jnp.ones((1, 2, DIM), jnp.float32)
    graphdef, params = nnx.split(m)
    growth = lambda p: jnp.sum(nnx.merge(graphdef, p)(h, h, jnp.zeros_like(h)))  # rewards A > 1
    grads = jax.grad(growth)(params)
    stepped = nnx.merge(graphdef, jax.tree.map(lambda p, g: p + 0.01 * g, params, grads))
    assert float(jnp.min(stepped.get_A())) > 1.0              # nothing pulls it back inside


def test_free_injection_gets_gradients_in_a_model_and_is_not_convertible():
    from mythos_jax.interop.openmythos import to_torch_state_dict

    cfg = variants.tiny_mla(injection="free", act="off")
    assert not cfg.has_openmythos_weights
    model = OpenMythos(cfg, rngs=nnx.Rngs(0))
    assert isinstance(model.recurrent.injection, FreeInjection)
    ids = jax.random.randint(jax.random.key(0), (2, 8), 0, cfg.vocab_size)
    graphdef, state = nnx.split(model)
    grads = jax.grad(lambda s: jnp.mean(nnx.merge(graphdef, s)(ids, 3) ** 2))(state)
    for name in ("A", "B"):
        assert float(jnp.abs(grads["recurrent"]["injection"][name][...]).sum()) > 0
    with pytest.raises(ValueError, match="injection='free'"):
        to_torch_state_dict(model)
