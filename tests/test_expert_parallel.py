"""Expert-parallel MoE dispatch on 8 fake CPU devices: the capacity (all_to_all) and dropless
(ragged_all_to_all, emulated on CPU) exchanges equal each other and the dense reference, as a
layer and inside the full model (forward and gradient), and compile to the intended
collectives."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mythos_jax import OpenMythos, variants
from mythos_jax.layers.moe_dispatch import dispatch
from mythos_jax.parallel import expert, init_sharded, make_mesh, state_shardings

MESHES = ["data=2,expert=4", "fsdp=4,expert=2"]
N_EXPERTS, DIM, HIDDEN, TOP_K = 8, 8, 6, 2


def make_inputs(n_tokens=64, n_experts=N_EXPERTS, seed=0):
    """x (N, D), expert_ids/weights (N, K), gate/up (E, D, F), down (E, F, D)."""
    keys = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(keys[0], (n_tokens, DIM))
    gate, up = (jax.random.normal(k, (n_experts, DIM, HIDDEN)) / 3 for k in keys[1:3])
    down = jax.random.normal(keys[3], (n_experts, HIDDEN, DIM)) / 3
    logits = jax.random.normal(keys[4], (n_tokens, n_experts)).at[:, 2].add(1.0)  # uneven
    _, expert_ids = jax.lax.top_k(logits, TOP_K)
    weights = jax.random.uniform(keys[5], (n_tokens, TOP_K))
    return x, expert_ids, weights, gate, up, down


def forward(impl, inputs, **options):
    """(out, dropped), jitted under the current mesh."""
    return jax.jit(functools.partial(dispatch, impl, **options))(*inputs)


def value_and_grads(impl, inputs, **options):
    """(out, dropped), d sum(out**2) / d (x, weights, gate, up, down), jitted under the
    current mesh."""
    x, expert_ids, weights, gate, up, down = inputs

    def run(x, weights, gate, up, down):
        return dispatch(impl, x, expert_ids, weights, gate, up, down, **options)

    def both(*args):
        return run(*args), jax.grad(lambda *a: jnp.sum(run(*a)[0] ** 2), argnums=range(5))(*args)

    return jax.jit(both)(x, weights, gate, up, down)


@pytest.mark.parametrize("spec", MESHES)
def test_exchanges_equal_each_other_and_dense(spec):
    inputs = make_inputs()
    (ref, _), ref_grads = value_and_grads("dense", inputs)
    with jax.set_mesh(make_mesh(spec)):
        results = {impl: value_and_grads(impl, inputs)       # capacity: buffers never fill
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
    inputs = make_inputs(n_tokens=128)
    capacity_factor, n_devices = 1.0, 8
    with jax.set_mesh(make_mesh("data=2,expert=4")):
        _, dropped = forward("capacity", inputs, capacity_factor=capacity_factor)
    n_local = 128 // n_devices
    capacity = int(np.ceil(capacity_factor * n_local * TOP_K / N_EXPERTS))
    ids = np.asarray(inputs[1]).reshape(n_devices, n_local * TOP_K)
    loads = np.stack([np.bincount(chunk, minlength=N_EXPERTS) for chunk in ids])
    expected = int(np.maximum(loads - capacity, 0).sum())
    assert int(dropped) == expected > 0


def test_token_count_not_divisible_by_devices_is_padded():
    inputs = make_inputs(n_tokens=3)                      # e.g. decoding 3 sequences
    ref, _ = forward("dense", inputs)
    with jax.set_mesh(make_mesh("data=2,expert=4")):
        for impl in ("capacity", "dropless"):
            out, dropped = forward(impl, inputs)
            assert int(dropped) == 0
            np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5, err_msg=impl)


def test_expert_count_must_divide_the_expert_axis():
    inputs = make_inputs(n_experts=6)
    with jax.set_mesh(make_mesh("data=2,expert=4")):
        with pytest.raises(ValueError, match=r"n_experts=6 .* size 4 of the mesh axis 'expert'"):
            forward("dropless", inputs)


def expert_collectives(hlo: str, op: str) -> int:
    """How many ``op`` instructions ("all-to-all", "all-gather") of the compiled ``hlo`` the
    shard_map emitted over the expert axis (GSPMD adds its own resharding collectives)."""
    return sum(f" {op}(" in line and "{'expert'}" in line and "shard_map/" in line
               for line in hlo.splitlines())


def test_collectives_in_the_compiled_exchanges():
    x, expert_ids, weights, gate, up, down = make_inputs()

    def hlo(impl, emulate_ragged=None, compiled=True):
        def loss(x, gate):
            out, _ = expert.expert_parallel_dispatch(
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
    expert._log_emulation_once.cache_clear()
    inputs = make_inputs(n_tokens=8)
    with caplog.at_level(logging.WARNING, logger=expert.__name__):
        with jax.set_mesh(make_mesh("data=2,expert=4")):
            forward("dropless", inputs)
            forward("grouped", inputs)
    messages = [r.getMessage() for r in caplog.records if r.name == expert.__name__]
    assert len(messages) == 1 and "ragged-all-to-all" in messages[0]


# ============================================================================ the full model
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
    graphdef, params, rest = nnx.split(init_sharded(cfg, mesh), nnx.Param, ...)
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
        assert expert_collectives(hlo, "all-to-all") == 0
        assert expert_collectives(hlo, "all-gather") > 0
