"""The traced forward (``model(ids, n, trace=...)``): opt-in, the default program untouched,
and every recorded quantity what the loop really computed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mythos_jax import LoopSpec, OpenMythos, variants
from mythos_jax.inference.cache import init_cache

N_LOOPS = 5
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 8)), jnp.int32)


@pytest.fixture(scope="module")
def model():
    """A tiny MLA model whose tokens route differently (a large router kernel), whose decay
    differs per channel and whose positions halt at different loops (halting bias -1)."""
    m = OpenMythos(variants.tiny_mla(), rngs=nnx.Rngs(0))
    keys = jax.random.split(jax.random.key(1), 3)
    router = m.recurrent.block.ffn.router.kernel
    router[...] = jax.random.normal(keys[0], router.shape)
    m.recurrent.injection.log_A[...] = jax.random.normal(keys[1], (m.cfg.dim,))
    halt = m.recurrent.act.halt
    halt.kernel[...] = 0.1 * jax.random.normal(keys[2], halt.kernel.shape)
    halt.bias[...] = jnp.full((1,), -1.0)
    m.eval()
    return m


@pytest.fixture(scope="module")
def forwards(model):
    """(traced at every position, traced at positions 0 and -1, the default logits): one
    compiled program."""
    return nnx.jit(lambda m, ids: (m(ids, N_LOOPS, trace=True), m(ids, N_LOOPS, trace=(0, -1)),
                                   m(ids, N_LOOPS)))(model, IDS)


@pytest.fixture(scope="module")
def traced(forwards):
    return forwards[0]


def _scan_outputs(fn) -> list:
    """The outputs of the loop's one scan in ``fn``'s program."""
    (scan,) = [e for e in jax.make_jaxpr(fn)(IDS).jaxpr.eqns if e.primitive.name == "scan"]
    return scan.outvars


def test_trace_off_leaves_the_default_program_as_it_is(model):
    default = jax.make_jaxpr(lambda ids: model(ids, N_LOOPS))(IDS)
    for off in (False, None):
        explicit = jax.make_jaxpr(lambda ids: model(ids, N_LOOPS, trace=off))(IDS)
        assert str(explicit) == str(default)
    # The loop's scan outputs its carry (the LoopState) only, nothing stacked per iteration
    # (no memory for it); traced, it also stacks the 8 LoopRecord fields over the iterations.
    carry = len(jax.tree.leaves(model.recurrent.start(jnp.zeros((2, 8, model.cfg.dim)))))
    assert len(_scan_outputs(lambda ids: model(ids, N_LOOPS))) == carry
    stacked = _scan_outputs(lambda ids: model(ids, N_LOOPS, trace=True))[carry:]
    assert len(stacked) == 8 and all(v.aval.shape[0] == N_LOOPS for v in stacked)


def test_trajectory_logits_are_the_forward_logits(forwards):
    traced, _, logits = forwards
    np.testing.assert_array_equal(np.asarray(traced.logits), np.asarray(logits))


def test_shapes_of_every_stage(model, traced):
    cfg = model.cfg
    B, T, D, K = 2, 8, cfg.dim, cfg.n_experts_per_tok
    assert traced.embed.shape == traced.recurrent.shape == (B, T, D)
    assert [x.shape for x in traced.prelude] == [(B, T, D)] * cfg.prelude_layers
    assert [x.shape for x in traced.coda] == [(B, T, D)] * cfg.coda_layers
    loops = traced.loops
    assert loops.h.shape == (N_LOOPS, B, T, D)
    assert loops.halt_p.shape == loops.act_weight.shape == loops.halted.shape == (N_LOOPS, B, T)
    assert loops.expert_ids.shape == loops.expert_weights.shape == (N_LOOPS, B, T, K)
    assert loops.rho.shape == (N_LOOPS,) and loops.delta.shape == (N_LOOPS, B)


def test_act_record_rebuilds_the_recurrence_output(model, traced):
    """h_out = sum_t w_t h_t; halted flags follow the cumulative p of running positions."""
    loops = traced.loops
    rebuilt = jnp.einsum("nbt,nbtd->btd", loops.act_weight, loops.h)
    np.testing.assert_allclose(np.asarray(rebuilt), np.asarray(traced.recurrent),
                               rtol=1e-5, atol=1e-5)
    p, halted = np.asarray(loops.halt_p), np.asarray(loops.halted)
    cumulative, was_halted = np.zeros(p.shape[1:]), np.zeros(p.shape[1:], bool)
    for t in range(N_LOOPS):
        cumulative = cumulative + p[t] * ~was_halted
        was_halted = was_halted | (cumulative >= model.cfg.act_threshold)
        np.testing.assert_array_equal(halted[t], was_halted)
    weights = np.asarray(loops.act_weight)
    assert np.all(weights[1:][halted[:-1]] == 0)          # a halted position adds nothing
    # The fixture's weights make positions halt at different loops, some within N_LOOPS.
    first = np.where(halted.any(0), np.argmax(halted, 0), -1)
    assert len(np.unique(first)) >= 2 and halted[-1].any()


def test_router_rho_and_relative_change(model, traced):
    cfg, loops = model.cfg, traced.loops
    ids, weights = np.asarray(loops.expert_ids), np.asarray(loops.expert_weights)
    assert ids.min() >= 0 and ids.max() < cfg.n_experts
    assert np.all(np.sort(ids, -1)[..., 1:] != np.sort(ids, -1)[..., :-1])     # distinct
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    assert len(np.unique(ids.reshape(-1, ids.shape[-1]), axis=0)) >= 2        # routing varies
    A = np.asarray(model.recurrent.injection.get_A())
    np.testing.assert_array_equal(np.asarray(loops.rho), np.full(N_LOOPS, np.abs(A).max()))
    h = np.concatenate([np.asarray(traced.prelude[-1])[None], np.asarray(loops.h)])
    expected = (np.linalg.norm((h[1:] - h[:-1]).reshape(N_LOOPS, 2, -1), axis=-1)
                / np.linalg.norm(h[1:].reshape(N_LOOPS, 2, -1), axis=-1))
    np.testing.assert_allclose(np.asarray(loops.delta), expected, rtol=1e-5)


def test_chosen_positions_keep_only_those(model, forwards):
    traced, some, _ = forwards
    chosen = [0, -1]
    for full, part in [(traced.embed, some.embed), (traced.recurrent, some.recurrent),
                       *zip(traced.prelude, some.prelude), *zip(traced.coda, some.coda)]:
        np.testing.assert_array_equal(np.asarray(part), np.asarray(full)[:, chosen])
    for name in ("h", "halt_p", "act_weight", "halted", "expert_ids", "expert_weights"):
        np.testing.assert_array_equal(np.asarray(getattr(some.loops, name)),
                                      np.asarray(getattr(traced.loops, name))[:, :, chosen])
    # rho and the relative change are over every position, whatever is kept.
    for name in ("rho", "delta"):
        np.testing.assert_array_equal(np.asarray(getattr(some.loops, name)),
                                      np.asarray(getattr(traced.loops, name)))
    assert some.loops.h.shape == (N_LOOPS, 2, 2, model.cfg.dim)


@pytest.mark.parametrize("call, message", [
    (lambda m: m(IDS, jnp.int32(3), trace=True), "trace needs a static loop count"),
    (lambda m: m(IDS, LoopSpec(3, exit="act"), trace=True), "trace needs a static loop count"),
    (lambda m: m(IDS, 3, trace=True, return_info=True), "cannot be combined with a cache or"),
    (lambda m: m(IDS, 3, trace=True, cache=init_cache(m.cfg, 2, 16, 3)), "cannot be combined"),
    (lambda m: m(IDS, 3, trace=(8,)), r"positions in \[-8, 8\), got \(8,\)"),
    (lambda m: m(IDS, 3, trace=()), "non-empty tuple of positions"),
])
def test_trace_errors_name_the_problem(model, call, message):
    with pytest.raises(ValueError, match=message):
        call(model)
