"""MoE dispatch strategies (``moe.dispatch``, ``moe.expert_parallel``): on one device each
equals the dense reference (values and gradients) when nothing is dropped and "capacity" drops
and counts exactly the overflow; on 8 fake CPU devices the expert-parallel exchanges (capacity:
all_to_all; dropless/grouped: ragged_all_to_all, emulated on CPU) equal each other and the
dense reference, as a layer and inside the full model (forward and gradient), and compile to
the intended collectives."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mythos_jax import OpenMythos, variants
from mythos_jax.config import MythosConfig
from mythos_jax.modes import MoEImpl
from mythos_jax.moe import expert_parallel
from mythos_jax.moe.dispatch import STRATEGIES, dispatch
from mythos_jax.moe.expert_ffn import ragged_swiglu
from mythos_jax.moe.slots import sort_by_expert
from mythos_jax.parallel import init_sharded, make_mesh, state_shardings

N_EXPERTS, DIM, HIDDEN, TOP_K = 5, 8, 6, 2
EP_EXPERTS = 8                                   # expert-parallel: divisible by the expert axis
MESHES = ["data=2,expert=4", "fsdp=4,expert=2"]
jit_dispatch = jax.jit(dispatch, static_argnums=0,     # the jit cache is keyed by the mesh too
                       static_argnames=("capacity_factor", "grouped_matmul"))


def make_inputs(n_tokens=40, routing="balanced", n_experts=N_EXPERTS, seed=0):
    """x (N, D), expert_ids/weights (N, K), gate/up (E, D, F), down (E, F, D)."""
    keys = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(keys[0], (n_tokens, DIM))
    gate, up = (jax.random.normal(k, (n_experts, DIM, HIDDEN)) / 3 for k in keys[1:3])
    down = jax.random.normal(keys[3], (n_experts, HIDDEN, DIM)) / 3
    logits = jax.random.normal(keys[4], (n_tokens, n_experts))
    if routing == "skewed":
        logits = logits.at[:, 1].add(9.0).at[:, 3].add(9.0)    # (almost) all on experts 1, 3
    if routing == "uneven":
        logits = logits.at[:, 2].add(1.0)
    _, expert_ids = jax.lax.top_k(logits, TOP_K)
    weights = jax.random.uniform(keys[5], (n_tokens, TOP_K))
    return x, expert_ids, weights, gate, up, down


def ep_inputs(n_tokens=64, n_experts=EP_EXPERTS):
    """The inputs of the expert-parallel tests: uneven routing over 8 experts."""
    return make_inputs(n_tokens, "uneven", n_experts)


@functools.partial(jax.jit, static_argnames=("impl", "capacity_factor", "grouped_matmul"))
def value_and_grads(x, expert_ids, weights, gate, up, down, *, impl, capacity_factor=None,
                    grouped_matmul="auto"):
    """(out, dropped), d sum(out**2) / d (x, weights, gate, up, down), under the current mesh."""
    def run(x, weights, gate, up, down):
        return dispatch(impl, x, expert_ids, weights, gate, up, down,
                        capacity_factor=capacity_factor, grouped_matmul=grouped_matmul)

    result = run(x, weights, gate, up, down)
    grads = jax.grad(lambda *a: jnp.sum(run(*a)[0] ** 2), argnums=range(5))(
        x, weights, gate, up, down)
    return result, grads


def assert_matches_dense(inputs, **options):
    (out, dropped), grads = value_and_grads(*inputs, **options)
    (ref, _), ref_grads = value_and_grads(*inputs, impl="dense")
    assert int(dropped) == 0
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    for grad, ref_grad in zip(grads, ref_grads):
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-5)


# ============================================================================ one device
def test_strategies_cover_every_moe_impl():
    assert set(STRATEGIES) == set(MoEImpl)


@pytest.mark.parametrize("routing", ["balanced", "skewed", "one_token"])
@pytest.mark.parametrize("impl", ["grouped", "dropless", "capacity"])
def test_strategies_equal_dense_when_nothing_is_dropped(impl, routing):
    inputs = make_inputs(1 if routing == "one_token" else 40, routing)
    assert_matches_dense(inputs, impl=impl)           # capacity_factor None: buffers never fill


def loop_reference(x, expert_ids, weights, gate, up, down) -> np.ndarray:
    """Each (token, choice) through its expert, one at a time (float64 NumPy)."""
    x, gate, up, down = (np.asarray(a, np.float64) for a in (x, gate, up, down))
    out = np.zeros_like(x)
    for n, (experts, token_weights) in enumerate(zip(np.asarray(expert_ids),
                                                     np.asarray(weights, np.float64))):
        for e, w in zip(experts, token_weights):
            a, b = x[n] @ gate[e], x[n] @ up[e]
            out[n] += w * ((a / (1 + np.exp(-a)) * b) @ down[e])
    return out


@pytest.mark.parametrize("n_tokens", [1, 2, 3, 5, 40])
@pytest.mark.parametrize("impl", ["dense", "grouped"])
def test_dispatch_equals_a_per_token_loop(impl, n_tokens):
    """Decode sizes included: 1-2 tokens (rows < experts: per-row kernels), 3-5 tokens (rows
    >= experts: every expert on every token), 40 (blocks)."""
    inputs = make_inputs(n_tokens, "uneven")
    out, _ = jit_dispatch(impl, *inputs)
    np.testing.assert_allclose(out, loop_reference(*inputs), rtol=1e-5, atol=1e-5)


def test_megablox_gmm_interpreted_equals_ragged_dot():
    inputs = make_inputs(24, "skewed")
    assert_matches_dense(inputs, impl="dropless", grouped_matmul="megablox")
    x, expert_ids, _, gate, up, down = inputs
    sort = sort_by_expert(expert_ids.reshape(-1), N_EXPERTS)
    rows = x[sort.order // TOP_K]
    np.testing.assert_allclose(
        ragged_swiglu(rows, sort.group_sizes, gate, up, down, grouped_matmul="megablox"),
        ragged_swiglu(rows, sort.group_sizes, gate, up, down, grouped_matmul="ragged_dot"),
        rtol=1e-6, atol=1e-6)


def numpy_capacity_keep(expert_ids: np.ndarray, n_experts: int, capacity: int) -> np.ndarray:
    """(N, K) bool: which rows find a slot; first choices of all tokens go first."""
    load, keep = np.zeros(n_experts, int), np.zeros(expert_ids.shape, bool)
    for choice in range(expert_ids.shape[1]):
        for token in range(expert_ids.shape[0]):
            expert = expert_ids[token, choice]
            keep[token, choice] = load[expert] < capacity
            load[expert] += keep[token, choice]
    return keep


@pytest.mark.parametrize("routing, capacity_factor", [("balanced", 1.0), ("balanced", 0.5),
                                                      ("skewed", 1.25)])
def test_capacity_drops_and_counts_the_overflow(routing, capacity_factor):
    x, expert_ids, weights, gate, up, down = make_inputs(40, routing)
    capacity = int(np.ceil(capacity_factor * 40 * TOP_K / N_EXPERTS))
    keep = numpy_capacity_keep(np.asarray(expert_ids), N_EXPERTS, capacity)
    out, dropped = jit_dispatch("capacity", x, expert_ids, weights, gate, up, down,
                                capacity_factor=capacity_factor)
    assert int(dropped) == int((~keep).sum()) > 0
    expected, _ = jit_dispatch("dense", x, expert_ids, weights * keep, gate, up, down)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_padding_rows_are_neither_computed_nor_counted():
    x, expert_ids, weights, gate, up, down = make_inputs(12)
    padded_ids = expert_ids.at[-3:].set(N_EXPERTS)               # id E marks padding rows
    for impl in ("grouped", "dropless", "capacity"):
        out, dropped = jit_dispatch(impl, x, padded_ids, weights, gate, up, down)
        ref, _ = jit_dispatch("dense", x[:-3], expert_ids[:-3], weights[:-3], gate, up, down)
        assert int(dropped) == 0, impl
        np.testing.assert_allclose(out[:-3], ref, rtol=1e-5, atol=1e-5, err_msg=impl)
        np.testing.assert_array_equal(out[-3:], 0)


@pytest.mark.parametrize("kwargs, match", [(dict(impl="ragged"), "moe_impl"),
                                           (dict(grouped_matmul="cuda"), "grouped_matmul")])
def test_bad_dispatch_arguments(kwargs, match):
    options = dict(impl="dropless") | kwargs
    with pytest.raises(ValueError, match=match):
        dispatch(options.pop("impl"), *make_inputs(4), **options)


@pytest.mark.parametrize("value", [0.0, -1.0, "big"])
def test_capacity_factor_is_validated(value):
    with pytest.raises(ValueError, match="capacity_factor"):
        MythosConfig(capacity_factor=value)


# ============================================================================ expert parallel
@pytest.mark.parametrize("spec", MESHES)
def test_exchanges_equal_each_other_and_dense(spec):
    inputs = ep_inputs()
    (ref, _), ref_grads = value_and_grads(*inputs, impl="dense")
    with jax.set_mesh(make_mesh(spec)):
        results = {impl: value_and_grads(*inputs, impl=impl)   # capacity: buffers never fill
                   for impl in ("capacity", "dropless", "grouped")}
    for impl, ((out, dropped), grads) in results.items():
        assert int(dropped) == 0, impl
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5, err_msg=impl)
        for grad, ref_grad in zip(grads, ref_grads):
            np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-5, err_msg=impl)
    np.testing.assert_allclose(results["capacity"][0][0], results["dropless"][0][0],
                               rtol=1e-6, atol=1e-6)


def test_capacity_drops_per_source_device():
    """Each device fills its own (E, C) buffers, C = ceil(cf * n_local * K / E)."""
    inputs = ep_inputs(n_tokens=128)
    capacity_factor, n_devices = 1.0, 8
    with jax.set_mesh(make_mesh("data=2,expert=4")):
        _, dropped = jit_dispatch("capacity", *inputs, capacity_factor=capacity_factor)
    n_local = 128 // n_devices
    capacity = int(np.ceil(capacity_factor * n_local * TOP_K / EP_EXPERTS))
    ids = np.asarray(inputs[1]).reshape(n_devices, n_local * TOP_K)
    loads = np.stack([np.bincount(chunk, minlength=EP_EXPERTS) for chunk in ids])
    expected = int(np.maximum(loads - capacity, 0).sum())
    assert int(dropped) == expected > 0


def test_token_count_not_divisible_by_devices_is_padded():
    inputs = ep_inputs(n_tokens=3)                        # e.g. decoding 3 sequences
    ref, _ = jit_dispatch("dense", *inputs)
    with jax.set_mesh(make_mesh("data=2,expert=4")):
        for impl in ("capacity", "dropless"):
            out, dropped = jit_dispatch(impl, *inputs)
            assert int(dropped) == 0
            np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5, err_msg=impl)


def test_expert_count_must_divide_the_expert_axis():
    inputs = ep_inputs(n_experts=6)
    with jax.set_mesh(make_mesh("data=2,expert=4")):
        with pytest.raises(ValueError, match=r"n_experts=6 .* size 4 of the mesh axis 'expert'"):
            jit_dispatch("dropless", *inputs)


def expert_collectives(hlo: str, op: str) -> int:
    """How many ``op`` instructions ("all-to-all", "all-gather") of the compiled ``hlo`` the
    shard_map emitted over the expert axis (GSPMD adds its own resharding collectives)."""
    return sum(f" {op}(" in line and "{'expert'}" in line and "shard_map/" in line
               for line in hlo.splitlines())


def test_collectives_in_the_compiled_exchanges():
    x, expert_ids, weights, gate, up, down = ep_inputs()

    def hlo(impl, emulate_ragged=None, compiled=True):
        def loss(x, gate):
            out, _ = expert_parallel.expert_parallel_dispatch(
                impl, jax.sharding.get_abstract_mesh(), x, expert_ids, weights, gate, up, down,
                emulate_ragged=emulate_ragged)
            return jnp.sum(out ** 2)

        lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, gate)
        return lowered.compile().as_text() if compiled else lowered.as_text()

    with jax.set_mesh(make_mesh("data=2,expert=4")):
        capacity = hlo("capacity")
        emulated = hlo("dropless")
        ragged = hlo("dropless", emulate_ragged=False, compiled=False)   # XLA:CPU cannot compile
    assert expert_collectives(capacity, "all-to-all") >= 4       # 2 forward, 2 backward
    assert expert_collectives(emulated, "all-to-all") == 0
    assert expert_collectives(emulated, "all-gather") > 0
    assert ragged.count("custom_call @ragged_all_to_all") >= 4     # 2 forward, 2 backward


def test_emulation_is_logged_once(caplog):
    expert_parallel._log_emulation_once.cache_clear()
    inputs = ep_inputs(n_tokens=8)
    name = expert_parallel.__name__
    with caplog.at_level(logging.WARNING, logger=name):
        with jax.set_mesh(make_mesh("data=2,expert=4")):
            jit_dispatch("dropless", *inputs)
            jit_dispatch("grouped", *inputs)
    messages = [r.getMessage() for r in caplog.records if r.name == name]
    assert len(messages) == 1 and "ragged-all-to-all" in messages[0]


# ============================================================================ the full model
@pytest.mark.parametrize("impl", ["grouped", "dropless"])
def test_model_dispatches_agree_with_dense(impl):
    ids = jax.random.randint(jax.random.key(0), (2, 16), 0, variants.tiny_mla().vocab_size)
    dense = OpenMythos(variants.tiny_mla(moe_impl="dense"), rngs=nnx.Rngs(3))(ids)
    other = OpenMythos(variants.tiny_mla(moe_impl=impl), rngs=nnx.Rngs(3))(ids)
    np.testing.assert_allclose(other, dense, atol=2e-5)


def _loss(model, ids):
    logits = model(ids, 2)
    log_probs = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(log_probs, ids[:, 1:, None], axis=-1))


def _step(graphdef):
    """(loss, grads of the nnx.Params) of a pure function of the model state."""
    def step(params, rest, ids):
        return jax.value_and_grad(lambda p: _loss(nnx.merge(graphdef, p, rest), ids))(params)
    return step


@functools.cache
def _single_device_dense():
    """(ids, loss, grads) of the dense reference on one device."""
    cfg = variants.tiny_mla(n_experts=8, moe_impl="dense")
    graphdef, params, rest = nnx.split(OpenMythos(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    ids = jax.random.randint(jax.random.key(1), (8, 16), 0, cfg.vocab_size)
    return ids, *jax.jit(_step(graphdef))(params, rest, ids)


@pytest.mark.parametrize("spec, impl", [("data=2,expert=4", "capacity"),
                                        ("fsdp=4,expert=2", "capacity"),
                                        ("data=2,expert=4", "grouped"),
                                        ("fsdp=4,expert=2", "dropless")])
def test_model_forward_and_gradient_equal_single_device(spec, impl):
    ids, ref_loss, ref_grads = _single_device_dense()
    cfg = variants.tiny_mla(n_experts=8, moe_impl=impl, capacity_factor=4.0)  # E/K: no drops
    mesh = make_mesh(spec)
    model = init_sharded(lambda: OpenMythos(cfg, rngs=nnx.Rngs(0)), mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = jax.device_put(ids, NamedSharding(mesh, P(("data", "fsdp"))))
    step = jax.jit(_step(graphdef), in_shardings=(state_shardings(params, mesh),
                                                  state_shardings(rest, mesh), ids.sharding))
    with jax.set_mesh(mesh):
        compiled = step.lower(params, rest, ids).compile()
    loss, grads = compiled(params, rest, ids)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for (path, grad), ref_grad in zip(jax.tree_util.tree_leaves_with_path(grads),
                                      jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))
    hlo = compiled.as_text()
    if impl == "capacity":
        assert expert_collectives(hlo, "all-to-all") >= 4       # 2 forward, 2 backward
    else:                                                        # the CPU emulation
        assert expert_collectives(hlo, "all-gather") > 0
        assert expert_collectives(hlo, "all-to-all") == 0
