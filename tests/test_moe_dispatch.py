"""MoE dispatch strategies on one device: each equals the dense reference (values and
gradients) when nothing is dropped; "capacity" drops and counts exactly the overflow."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mythos_jax.config import MythosConfig
from mythos_jax.layers.moe_dispatch import dispatch, ragged_swiglu, sort_by_expert

N_EXPERTS, DIM, HIDDEN, TOP_K = 5, 8, 6, 2
jit_dispatch = jax.jit(dispatch, static_argnums=0,
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
    _, expert_ids = jax.lax.top_k(logits, TOP_K)
    weights = jax.random.uniform(keys[5], (n_tokens, TOP_K))
    return x, expert_ids, weights, gate, up, down


@functools.partial(jax.jit, static_argnames=("impl", "capacity_factor", "grouped_matmul"))
def value_and_grads(x, expert_ids, weights, gate, up, down, *, impl, capacity_factor=None,
                    grouped_matmul="auto"):
    """(out, dropped), d sum(out**2) / d (x, weights, gate, up, down)."""
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


@pytest.mark.parametrize("routing", ["balanced", "skewed", "one_token"])
@pytest.mark.parametrize("impl", ["grouped", "dropless", "capacity"])
def test_strategies_equal_dense_when_nothing_is_dropped(impl, routing):
    inputs = make_inputs(1 if routing == "one_token" else 40, routing)
    assert_matches_dense(inputs, impl=impl)           # capacity_factor None: buffers never fill


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
