"""Loop drivers (run-time counts, early exit, truncated backprop), schedules, math variants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mythos_jax import OpenMythos, loops, schedules, variants
from mythos_jax.kernels.masks import KeySpan
from mythos_jax.layers.recurrence import LoopState
from mythos_jax.layers.rope import rope_cos_sin
from mythos_jax.loops import LoopSpec
from numerics import assert_close, assert_trees_close

# fp32 throughout: values to the float rounding of a loss of order 1; gradients per tensor,
# relative to the tensor's largest entry (the halting bias, one sum over every position and
# loop that cancels to ~1e-5, is the worst: 1e-5 relative seen).
VALUE_RTOL = 1e-6
LOGIT_RTOL = 1e-5     # logits of a while loop or a batch row against a static scan
GRAD_RTOL = 1e-4


@pytest.fixture(scope="module")
def ids():
    return jax.random.randint(jax.random.key(0), (3, 12), 0, 256)


def _jit(model, **kwargs):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, i, n: nnx.merge(graphdef, s)(i, LoopSpec(n, **kwargs),
                                                        return_info=True)[:2])
    return lambda i, n: fn(state, i, n), fn


def test_run_time_count_compiles_once_and_matches_static(halting_model, ids):
    call, fn = _jit(halting_model)
    for n in (2, 5, 11):
        logits, info = call(ids, jnp.int32(n))
        assert_close(logits, halting_model(ids, n), LOGIT_RTOL)
        np.testing.assert_array_equal(info.loops_run, [n] * 3)
    assert fn._cache_size() == 1


def test_per_sequence_counts_equal_separate_runs(halting_model, ids):
    call, _ = _jit(halting_model)
    counts = jnp.array([1, 4, 7], jnp.int32)
    logits, info = call(ids, counts)
    np.testing.assert_array_equal(info.loops_run, counts)
    for b, n in enumerate([1, 4, 7]):
        assert_close(logits[b], halting_model(ids[b:b + 1], n)[0], LOGIT_RTOL)


def test_act_exit_equals_static_loop_with_fewer_iterations(halting_model, ids):
    call, _ = _jit(halting_model, exit="act")
    logits, info = call(ids, jnp.int32(16))
    assert_close(logits, halting_model(ids, 16), LOGIT_RTOL)
    assert int(info.loops_run.max()) < 16


@pytest.mark.parametrize("rule, threshold", [("delta", 0.05), ("kl", 1e-3)])
def test_convergence_exits_stop_early_and_freeze(halting_model, ids, rule, threshold):
    cfg_off = halting_model.cfg.replace(act="off")
    off = OpenMythos(cfg_off, rngs=nnx.Rngs(0))
    call, _ = _jit(off, exit=rule, threshold=threshold)
    logits, info = call(ids, jnp.int32(40))
    loops_run = np.asarray(info.loops_run)
    assert (loops_run >= 1).all() and (loops_run < 40).all()
    for b in range(3):  # a stopped sequence is exactly the static run of its loop count
        assert_close(logits[b], off(ids[b:b + 1], int(loops_run[b]))[0], LOGIT_RTOL)
    never, _ = _jit(off, exit=rule, threshold=0.0)
    assert (np.asarray(never(ids, jnp.int32(6))[1].loops_run) == 6).all()


def test_kl_entropy_exit_also_waits_for_low_entropy(halting_model, ids):
    off = OpenMythos(halting_model.cfg.replace(act="off"), rngs=nnx.Rngs(0))
    kl = np.asarray(_jit(off, exit="kl", threshold=1e-3)[0](ids, jnp.int32(40))[1].loops_run)
    both = np.asarray(_jit(off, exit="kl_entropy", threshold=1e-3)[0](
        ids, jnp.int32(40))[1].loops_run)
    assert (both >= kl).all()
    # An untrained model's next-token entropy is about log(vocab) > the 3-nat bound: no exit.
    entropy = -jnp.sum(jax.nn.softmax(off(ids, 2)) * jax.nn.log_softmax(off(ids, 2)), -1)
    assert float(entropy.max()) > loops.KL_ENTROPY_BOUND and (both == 40).all()


def test_state_rms_reports_the_final_hidden_state(halting_model, ids):
    info = halting_model(ids, 3, return_info=True).info
    embedded = halting_model._embed(ids)
    assert info.state_rms.shape == (3,) and (np.asarray(info.state_rms) > 0).all()
    deeper = halting_model(ids, 9, return_info=True).info.state_rms
    assert not np.allclose(info.state_rms, deeper)
    assert float(jnp.sqrt(jnp.mean(embedded ** 2))) < float(info.state_rms.min())


def _loss(graphdef, ids, host_checks=False, **kwargs):
    def loss(state, n):
        return jnp.mean(nnx.merge(graphdef, state)(ids, LoopSpec(n, **kwargs),
                                                   host_checks=host_checks) ** 2)
    return loss


def _reference_loss(graphdef, ids, n: int, backprop_depth: int | None = None):
    """``mean(logits ** 2)`` of a hand-written forward, as a function of the state: prelude,
    ``n`` block steps in a Python loop whose carry has its gradient stopped
    (``jax.lax.stop_gradient``) after the first ``n - backprop_depth`` iterations, coda,
    norm, tied head."""
    def loss(state):
        model = nnx.merge(graphdef, state)
        batch, length = ids.shape
        rope = rope_cos_sin(jnp.arange(length), model.cfg.rope_dim, model.cfg.rope_theta)
        span = KeySpan.causal(batch)
        x = model.embed[...][ids]
        for layer in model.prelude:
            x = layer(x, rope, span)[0]
        block, cut = model.recurrent, n - (backprop_depth or n)
        carry = block.start(x)
        for t in range(n):
            if t == cut and cut > 0:
                carry = jax.lax.stop_gradient(carry)
            carry, _ = block.step(carry, x, jnp.int32(t), rope, span, None)
        h = block.output(carry)
        for layer in model.coda:
            h = layer(h, rope, span)[0]
        return jnp.mean((model.norm(h) @ model.embed[...].T) ** 2)
    return loss


def test_masked_training_driver_gives_the_static_gradient(halting_model, ids):
    graphdef, state = nnx.split(halting_model)
    exact = jax.grad(lambda s: _loss(graphdef, ids)(s, 4))(state)
    masked = jax.jit(jax.grad(_loss(graphdef, ids, max_loops=9)))(state, jnp.int32(4))
    assert_trees_close(masked, exact, GRAD_RTOL)


def test_truncated_backprop_is_the_stop_gradient_reference(halting_model, ids):
    """backprop_depth=2, per-sequence counts (1, 3, 5) in one compiled step: the value of the
    full loop and, per sequence, the gradient of a loop cut after n - 2 iterations (none for
    n = 1 < 2: full backprop)."""
    graphdef, state = nnx.split(halting_model)
    counts = (1, 3, 5)
    value, grads = jax.jit(jax.value_and_grad(_loss(graphdef, ids, backprop_depth=2)))(
        state, jnp.array(counts, jnp.int32))
    rows = [jax.value_and_grad(_reference_loss(graphdef, ids[b:b + 1], n, 2))(state)
            for b, n in enumerate(counts)]
    assert_close(value, sum(v for v, _ in rows) / len(rows), VALUE_RTOL)
    assert_trees_close(grads, jax.tree.map(lambda *g: sum(g) / len(g), *[g for _, g in rows]),
                       GRAD_RTOL)
    full_row = _loss(graphdef, ids[2:])(state, 5)            # the reference is the model
    assert_close(rows[2][0], full_row, VALUE_RTOL)


def test_loop_remat_changes_no_value_and_no_gradient(halting_model, ids):
    """cfg.loop_remat "full" and "none" against "dots" (the rematerialised scan of the
    truncated driver): the same loss, bit for bit, and the same gradients."""
    state = nnx.state(halting_model)
    results = {}
    for remat in ("dots", "full", "none"):
        graphdef = nnx.graphdef(OpenMythos(halting_model.cfg.replace(loop_remat=remat),
                                           rngs=nnx.Rngs(0)))
        results[remat] = jax.jit(jax.value_and_grad(_loss(graphdef, ids, backprop_depth=2)))(
            state, jnp.int32(4))
    for remat in ("full", "none"):
        np.testing.assert_array_equal(results[remat][0], results["dots"][0])
        assert_trees_close(results[remat][1], results["dots"][1], GRAD_RTOL)


@pytest.mark.parametrize("schedule", [
    schedules.Fixed(3), schedules.Uniform(lo=2, hi=5), schedules.Poisson(4.0, max_loops=12),
    schedules.LogNormalPoisson(4.0, max_loops=12), schedules.Uniform(lo=1, hi=6, per_sequence=True),
])
def test_schedules_sample_in_range(schedule):
    draws = jnp.stack([schedule.sample(s, jax.random.key(s), 4) for s in range(300)])
    assert draws.dtype == jnp.int32
    assert draws.shape == ((300, 4) if schedule.per_sequence else (300,))
    assert int(draws.min()) >= 1 and int(draws.max()) <= schedule.max_loops
    assert abs(float(draws.mean()) - schedule.mean) < 0.2 * schedule.mean + 0.3


def test_curriculum_moves_the_mean():
    curriculum = schedules.Curriculum(schedules.Poisson(8.0, per_sequence=True, max_loops=30),
                                  start_mean=1.0, ramp_steps=100)
    assert float(curriculum.mean_at(0)) == 1.0 and float(curriculum.mean_at(100)) == 8.0
    early = jnp.concatenate([curriculum.sample(0, jax.random.key(i), 16) for i in range(50)])
    late = jnp.concatenate([curriculum.sample(500, jax.random.key(i), 16) for i in range(50)])
    assert float(early.mean()) < 2.0 < 6.0 < float(late.mean())
    assert curriculum.per_sequence and curriculum.max_loops == 30


def test_sampled_training_step_jits_once_with_a_custom_schedule(halting_model, ids):
    graphdef, state = nnx.split(halting_model)

    def my_schedule(step, key):  # a user function: per-sequence counts in 1..5
        return 1 + jax.random.randint(key, (3,), 0, 5) + step % 2

    @jax.jit
    def step_fn(state, step, key):
        n = schedules.sample_loops(my_schedule, step, key, batch=3)
        return jax.grad(_loss(graphdef, ids, backprop_depth=2))(state, n)

    for s in range(3):
        step_fn(state, jnp.int32(s), jax.random.key(s))
    assert step_fn._cache_size() == 1


def test_act_variants():
    B, T, D = 2, 3, 4
    h = jnp.arange(B * T * D, dtype=jnp.float32).reshape(B, T, D)
    state = LoopState(h, jnp.ones_like(h), jnp.array([[0.3, 0.99, 0.5]] * 2),
                      jnp.array([[False, True, False]] * 2), jnp.full((B, T), 0.5))
    readouts = {}
    for act in ("openmythos", "flush", "off"):
        block = OpenMythos(variants.tiny_mla(act=act), rngs=nnx.Rngs(0)).recurrent
        readouts[act] = block.output(state)
    np.testing.assert_array_equal(readouts["openmythos"], state.h_out)
    np.testing.assert_array_equal(readouts["off"], h)
    leftover = jnp.array([0.7, 0.0, 0.5])[None, :, None]
    np.testing.assert_allclose(readouts["flush"], state.h_out + leftover * h)
    ponder = block.ponder_cost(state, jnp.array([4, 4]))
    np.testing.assert_allclose(ponder[0], [0.5 + 0.7 * 4, 0.5, 0.5 + 0.5 * 4])


def test_ponder_cost_is_an_expected_loop_count_with_gradient(halting_model, ids):
    info = halting_model(ids, 5, return_info=True).info
    assert (info.ponder_cost >= 1.0).all() and (info.ponder_cost <= 5.0 + 1e-5).all()
    graphdef, state = nnx.split(halting_model)
    grads = jax.grad(lambda s: jnp.mean(nnx.merge(graphdef, s)(ids, 5, return_info=True).info
                                        .ponder_cost))(state)
    assert float(jnp.abs(grads["recurrent"]["act"]["halt"]["kernel"][...]).sum()) > 0


def test_parcae_injection_trains_and_is_not_convertible(ids):
    from mythos_jax.interop.openmythos import to_torch_state_dict

    cfg = variants.tiny_mla(injection="parcae", prelude_norm=True, readout=True, act="off")
    model = OpenMythos(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    value, grads = jax.value_and_grad(lambda s: _loss(graphdef, ids)(s, 3))(state)
    assert np.isfinite(float(value))
    for name in ("A_log", "dt_bias", "B"):
        assert float(jnp.abs(grads["recurrent"]["injection"][name][...]).sum()) > 0
    assert float(jnp.abs(grads["readout"]["kernel"][...]).sum()) > 0
    with pytest.raises(ValueError, match="injection='parcae'"):
        to_torch_state_dict(model)


def test_additive_injection_is_h_plus_e_plus_u_and_is_not_convertible():
    from mythos_jax.interop.openmythos import to_torch_state_dict
    from mythos_jax.layers.recurrence import AdditiveInjection, LTIInjection

    h, e, u = (jax.random.normal(jax.random.key(i), (2, 5, 64)) for i in range(3))
    np.testing.assert_array_equal(AdditiveInjection(64)(h, e, u), h + e + u)
    np.testing.assert_array_equal(AdditiveInjection(64).get_A(), np.ones(64))
    cfg = variants.tiny_mla(injection="additive", act="off")
    additive, lti = OpenMythos(cfg, rngs=nnx.Rngs(0)), OpenMythos(
        cfg.replace(injection="openmythos"), rngs=nnx.Rngs(0))
    assert not nnx.state(additive.recurrent.injection, nnx.Param)     # no A, no B
    assert isinstance(lti.recurrent.injection, LTIInjection)
    ids = jnp.arange(12).reshape(2, 6)
    assert not np.allclose(additive(ids, 3), lti(ids, 3))
    with pytest.raises(ValueError, match="injection='additive'"):
        to_torch_state_dict(additive)


def test_loop_embed_scale_scales_the_loop_embedding_and_blocks_conversion():
    from mythos_jax.interop.openmythos import to_torch_state_dict
    from mythos_jax.layers.recurrence import loop_index_embedding

    h = jnp.zeros((1, 2, 64))
    full = loop_index_embedding(h, jnp.int32(3), 8)
    np.testing.assert_allclose(loop_index_embedding(h, jnp.int32(3), 8, 0.02), 0.02 * full,
                               rtol=1e-6)
    assert float(jnp.abs(full[..., 8:]).max()) == 0.0
    scaled = OpenMythos(variants.tiny_mla(loop_embed_scale=0.02), rngs=nnx.Rngs(0))
    default = OpenMythos(variants.tiny_mla(), rngs=nnx.Rngs(0))
    ids = jnp.arange(12).reshape(2, 6)
    assert not np.allclose(scaled(ids, 2), default(ids, 2))
    with pytest.raises(ValueError, match="loop_embed_scale=0.02"):
        to_torch_state_dict(scaled)


# ---------------------------------------------------------------- errors
def test_bad_loop_arguments_raise(halting_model, ids):
    with pytest.raises(ValueError, match="loops must be >= 1"):
        halting_model(ids, jnp.int32(0))
    with pytest.raises(ValueError, match="above the compiled bound max_loops=4"):
        halting_model(ids, LoopSpec(jnp.int32(6), max_loops=4))
    with pytest.raises(ValueError, match="backprop_depth must be an int >= 1"):
        halting_model(ids, LoopSpec(3, backprop_depth=0))
    with pytest.raises(ValueError, match="exit: must be one of"):
        halting_model(ids, LoopSpec(3, exit="entropy"))
    with pytest.raises(ValueError, match="cannot be combined with backprop_depth"):
        LoopSpec(3, exit="kl", backprop_depth=2)
    with pytest.raises(TypeError, match="loops must be an int"):
        LoopSpec(2.5)
    with pytest.raises(ValueError, match="shape \\(batch,\\)"):
        halting_model(ids, jnp.array([1, 2], jnp.int32))
    off = OpenMythos(variants.tiny_mla(act="off"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="exit='act' needs ACT"):
        off(ids, LoopSpec(3, exit="act"))


def test_traced_count_above_bound_fails_at_run_time_with_host_checks(halting_model, ids):
    graphdef, state = nnx.split(halting_model)
    step = jax.jit(jax.grad(_loss(graphdef, ids, host_checks=True, max_loops=4)))
    step(state, jnp.int32(4))
    with pytest.raises(Exception, match="above the compiled bound max_loops=4"):
        jax.block_until_ready(step(state, jnp.int32(5)))


@pytest.mark.parametrize("make, match", [
    (lambda: schedules.Poisson(0.0), "mean loop count must be positive"),
    (lambda: schedules.LogNormalPoisson(-1.0), "mean loop count must be positive"),
    (lambda: schedules.Fixed(2, backprop_depth=0), "backprop_depth must be an int >= 1"),
    (lambda: schedules.Uniform(lo=3, hi=2), "1 <= lo <= hi"),
    (lambda: schedules.Curriculum(schedules.Poisson(4.0), start_mean=0.0),
     "start_mean must be positive"),
])
def test_bad_schedules_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()
