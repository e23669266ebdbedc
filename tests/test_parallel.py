"""Meshes, logical-axis rules, sharded init, and sharded forward + training step == one device,
on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mythos_jax import OpenMythos, variants
from mythos_jax.parallel import (RULE_PRESETS, activation_rules, constrain, init_sharded,
                                 make_mesh, parse_mesh_spec, rules_preset, state_shardings,
                                 validate_rules)

CFG = variants.tiny_mla()
N_LOOPS = 2


def sharded_model(cfg, mesh, *rules):
    """OpenMythos(cfg, rngs=nnx.Rngs(0)) created directly in its shards."""
    return init_sharded(lambda: OpenMythos(cfg, rngs=nnx.Rngs(0)), mesh, *rules)


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


# ---------------------------------------------------------------- rules
def _attention(embed, heads):
    """MLA weights of one block: embed / heads dims per the preset (q_lora, kv_lora whole)."""
    return {"attn.q_down.kernel": P(embed, None), "attn.q_norm.weight": P(None),
            "attn.q_up_nope.kernel": P(None, heads), "attn.q_up_rope.kernel": P(None, heads),
            "attn.kv_down.kernel": P(embed, None), "attn.kv_norm.weight": P(None),
            "attn.kv_up.kernel": P(None, heads), "attn.wo.kernel": P(heads, embed),
            "attn_norm.weight": P(embed), "ffn_norm.weight": P(embed)}


# Default rules on data=1, fsdp=2, tensor=2, expert=2. The dense FFN's hidden width 85
# (dim * 4 // 3) does not divide by 2, so "mlp" stays whole there.
DENSE = {**_attention("fsdp", "tensor"), "ffn.gate.kernel": P("fsdp", None),
         "ffn.up.kernel": P("fsdp", None), "ffn.down.kernel": P(None, "fsdp")}
SNAPSHOT = {
    "embed": P("tensor", "fsdp"), "norm.weight": P("fsdp"),
    **{f"prelude.0.{k}": v for k, v in DENSE.items()},
    **{f"coda.0.{k}": v for k, v in DENSE.items()},
    **{f"recurrent.block.{k}": v for k, v in _attention("fsdp", "tensor").items()},
    "recurrent.block.ffn.router.kernel": P("fsdp", "expert"),
    "recurrent.block.ffn.router_bias": P("expert"),
    "recurrent.block.ffn.gate": P("expert", "fsdp", "tensor"),
    "recurrent.block.ffn.up": P("expert", "fsdp", "tensor"),
    "recurrent.block.ffn.down": P("expert", "tensor", "fsdp"),
    "recurrent.block.ffn.shared_experts.0.gate.kernel": P("fsdp", "tensor"),
    "recurrent.block.ffn.shared_experts.0.up.kernel": P("fsdp", "tensor"),
    "recurrent.block.ffn.shared_experts.0.down.kernel": P("tensor", "fsdp"),
    "recurrent.injection.log_A": P("fsdp"), "recurrent.injection.B": P("fsdp"),
    "recurrent.injection.log_dt": P(None),
    "recurrent.act.halt.kernel": P("fsdp", None), "recurrent.act.halt.bias": P(),
    "recurrent.lora.down.kernel": P("fsdp", None), "recurrent.lora.B": P(None, "fsdp"),
    "recurrent.lora.scale": P(None, None), "recurrent.norm.weight": P("fsdp"),
}


def _specs(rules):
    _, state = nnx.split(nnx.eval_shape(lambda: OpenMythos(CFG, rngs=nnx.Rngs(0))))
    shardings = state_shardings(state, make_mesh("fsdp=2,tensor=2,expert=2"), rules)
    flat = jax.tree_util.tree_flatten_with_path(
        shardings, is_leaf=lambda x: isinstance(x, NamedSharding))[0]
    return {".".join(str(getattr(k, "key", k)) for k in path): s.spec for path, s in flat}


def test_parameter_sharding_snapshot():
    assert _specs(rules_preset("default")) == SNAPSHOT


@pytest.mark.parametrize("preset, embed, gate, router, wo", [
    ("fsdp", P(None, "fsdp"), P(None, "fsdp", None), P("fsdp", None), P(None, "fsdp")),
    ("expert", P(None, "fsdp"), P("expert", "fsdp", None), P("fsdp", "expert"), P(None, "fsdp")),
    ("tensor", P("tensor", None), P(None, None, "tensor"), P(None, None), P("tensor", None)),
])
def test_rule_presets(preset, embed, gate, router, wo):
    specs = _specs(rules_preset(preset))
    assert (specs["embed"], specs["recurrent.block.ffn.gate"],
            specs["recurrent.block.ffn.router.kernel"],
            specs["recurrent.block.attn.wo.kernel"]) == (embed, gate, router, wo)


@pytest.mark.parametrize("rules, match", [
    ({**RULE_PRESETS["default"], "embd": "fsdp"}, "unknown logical axis 'embd'"),
    ({**RULE_PRESETS["default"], "embed": "fdsp"}, "unknown mesh axis 'fdsp'"),
    ({**RULE_PRESETS["default"], "batch": ("data", "model")}, "unknown mesh axis 'model'"),
    ({**RULE_PRESETS["default"], "batch": ("data", "data")}, "repeats a mesh axis"),
])
def test_bad_rules_raise(rules, match):
    with pytest.raises(ValueError, match=match):
        validate_rules(rules)
    with pytest.raises(ValueError, match=match):
        sharded_model(CFG, make_mesh("data=8"), rules)


def test_unknown_preset_and_indivisible_experts_raise():
    with pytest.raises(ValueError, match="unknown sharding rules preset 'zero3'"):
        rules_preset("zero3")
    cfg = variants.tiny_mla(n_experts=6, n_experts_per_tok=2)       # 6 experts over 4 devices
    with pytest.raises(ValueError, match="n_experts=6 is not divisible by the mesh axis "
                                         "'expert' of size 4"):
        sharded_model(cfg, make_mesh("data=2,expert=4"))
    # ... unless the rules do not shard experts
    sharded_model(cfg, make_mesh("data=2,expert=4"), rules_preset("fsdp"))


def test_activation_constraints():
    x = jnp.zeros((4, 8, 64))
    assert constrain(x, ("batch", "seq", "act_embed")) is x        # no mesh: no-op
    mesh = make_mesh("data=2,expert=4")
    fn = jax.jit(lambda x: constrain(x * 2, ("batch", "seq", "act_embed")))

    def sharded_as(y, spec):
        return y.sharding.is_equivalent_to(NamedSharding(mesh, spec), y.ndim)

    with jax.set_mesh(mesh):
        assert sharded_as(fn(x), P("data", None, None))              # 4 rows: expert skipped
        assert sharded_as(fn(jnp.zeros((8, 8, 64))), P(("data", "expert"), None, None))
        with activation_rules({**RULE_PRESETS["default"], "batch": None,
                               "act_embed": "expert"}):
            assert sharded_as(fn(x), P(None, None, "expert"))        # retraced, new rules


# ---------------------------------------------------------------- sharded == one device
def _loss(graphdef, params, rest, ids):
    """Next-token cross entropy + balance losses, and what the test compares."""
    logits, info, _ = nnx.merge(graphdef, params, rest)(ids[:, :-1], N_LOOPS, return_info=True)
    log_probs = jax.nn.log_softmax(logits)
    ce = -jnp.mean(jnp.take_along_axis(log_probs, ids[:, 1:, None], axis=-1))
    return ce + 0.01 * info.moe.aux_loss + 0.001 * info.moe.z_loss, (logits, info.moe)


@pytest.fixture(scope="module")
def single_device():
    model = OpenMythos(CFG, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = jax.random.randint(jax.random.key(0), (8, 9), 0, CFG.vocab_size)
    step = jax.jit(jax.value_and_grad(lambda p, r, i: _loss(graphdef, p, r, i), has_aux=True))
    return graphdef, params, rest, ids, step(params, rest, ids)


@pytest.mark.parametrize("spec", ["data=8", "data=2,expert=4", "fsdp=4,expert=2",
                                  "data=2,fsdp=2,tensor=2"])
def test_sharded_step_equals_single_device(single_device, spec):
    graphdef, params, rest, ids, ((loss, (logits, moe)), grads) = single_device
    mesh = make_mesh(spec)
    param_shardings = state_shardings(params, mesh)
    rest_shardings = state_shardings(rest, mesh)
    batch = NamedSharding(mesh, P(("data", "fsdp", "expert")))
    replicated = NamedSharding(mesh, P())
    step = jax.jit(jax.value_and_grad(lambda p, r, i: _loss(graphdef, p, r, i), has_aux=True),
                   in_shardings=(param_shardings, rest_shardings, batch),
                   out_shardings=((replicated, (batch, replicated)), param_shardings))
    with jax.set_mesh(mesh):
        (s_loss, (s_logits, s_moe)), s_grads = step(
            jax.device_put(params, param_shardings), jax.device_put(rest, rest_shardings),
            jax.device_put(ids, batch))
    gate = s_grads["recurrent"]["block"]["ffn"]["gate"][...]
    assert gate.sharding.spec == param_shardings["recurrent"]["block"]["ffn"]["gate"].spec
    assert len(gate.addressable_shards) == 8
    np.testing.assert_allclose(s_logits, logits, atol=1e-5)
    np.testing.assert_allclose(s_loss, loss, atol=1e-5)
    np.testing.assert_array_equal(s_moe.load_per_loop, moe.load_per_loop)
    np.testing.assert_allclose(s_moe.aux_loss, moe.aux_loss, atol=1e-5)
    for ours, theirs in zip(jax.tree.leaves(s_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_sharded_init_equals_eager_init():
    mesh = make_mesh("fsdp=4,expert=2")
    model = sharded_model(CFG, mesh)
    gate = model.recurrent.block.ffn.gate[...]
    assert gate.sharding.spec == P("expert", "fsdp", None)
    assert len(gate.addressable_shards) == 8
    reference = OpenMythos(CFG, rngs=nnx.Rngs(0))
    for ours, theirs in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                            jax.tree.leaves(nnx.state(reference, nnx.Param))):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-9)  # jitted init: 1 ulp
