"""Meshes from specs, logical-axis rules and directly-sharded init on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mythos_jax import OpenMythos, variants
from mythos_jax.parallel import init_sharded, make_mesh, parse_mesh_spec, state_shardings


def test_eight_fake_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize("spec, sizes", [
    ("data=2,fsdp=1,tensor=1,expert=4", (2, 1, 1, 4)),
    ("data=-1", (8, 1, 1, 1)),
    ("fsdp=4, expert=-1", (1, 4, 1, 2)),
    ("data=2,fsdp=2,tensor=2", (2, 2, 2, 1)),
])
def test_mesh_specs(spec, sizes):
    assert tuple(parse_mesh_spec(spec, 8).values()) == sizes
    assert tuple(make_mesh(spec).shape.values()) == sizes


@pytest.mark.parametrize("spec, match", [
    ("data=3", "needs 3 devices, there are 8"),
    ("data=-1,expert=-1", "only one axis may be -1"),
    ("pipeline=2", "AXIS=SIZE with AXIS in"),
    ("data=two", "must be an int"),
    ("data=2,data=4", "given twice"),
    ("data=3,expert=-1", "do not divide"),
])
def test_bad_mesh_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_mesh_spec(spec, 8)


@pytest.mark.parametrize("spec", ["data=8", "data=2,expert=4", "fsdp=4,expert=2",
                                  "data=2,fsdp=2,tensor=2"])
def test_sharded_init_and_forward_equal_single_device(spec):
    cfg = variants.tiny_mla()
    mesh = make_mesh(spec)
    model = init_sharded(cfg, mesh)
    reference = OpenMythos(cfg, rngs=nnx.Rngs(0))
    gate = model.recurrent.block.ffn.gate[...]
    expected_spec = P("expert" if mesh.shape["expert"] > 1 else None,
                      "fsdp" if mesh.shape["fsdp"] > 1 else None,
                      "tensor" if mesh.shape["tensor"] > 1 else None)
    assert gate.sharding.spec == expected_spec
    assert len(gate.addressable_shards) == 8
    for ours, theirs in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                            jax.tree.leaves(nnx.state(reference, nnx.Param))):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-9)  # jitted init: 1 ulp

    graphdef, state = nnx.split(model)
    ids = jax.device_put(jax.random.randint(jax.random.key(0), (8, 16), 0, cfg.vocab_size),
                         NamedSharding(mesh, P(("data", "fsdp"))))
    forward = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i, n_loops=2),
                      in_shardings=(state_shardings(state, mesh), ids.sharding))
    np.testing.assert_allclose(forward(state, ids), reference(ids, n_loops=2), atol=2e-5)


def test_dimensions_the_mesh_does_not_divide_stay_replicated():
    cfg = variants.tiny_mla(n_experts=6, n_experts_per_tok=2)   # 6 experts over 4 devices
    model = init_sharded(cfg, make_mesh("data=2,expert=4"))
    assert model.recurrent.block.ffn.gate[...].sharding.spec == P(None, None, None)
