import dataclasses

import pytest

from mythos_jax import MythosConfig
from mythos_jax.interop.openmythos import OPENMYTHOS_FIELDS, import_reference


def test_fields_and_defaults_match_openmythos():
    reference = import_reference().MythosConfig()
    ours = MythosConfig()
    reference_fields = [f.name for f in dataclasses.fields(reference)]
    assert list(OPENMYTHOS_FIELDS) == reference_fields
    for name in reference_fields:
        assert getattr(ours, name) == getattr(reference, name), name


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        MythosConfig().dim = 3


@pytest.mark.parametrize("changes, field", [
    (dict(dim=100, n_heads=16), "dim"),                       # dim % n_heads
    (dict(attn_type="gqa", n_heads=16, n_kv_heads=5), "n_kv_heads"),
    (dict(attn_type="gqa", dim=48, n_heads=16), "dim"),         # odd GQA head dim (3)
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(dim=24, n_heads=4), "dim"),                           # dim // 8 = 3 is odd
    (dict(n_experts=4, n_experts_per_tok=5), "n_experts_per_tok"),
    (dict(n_experts_per_tok=0), "n_experts_per_tok"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(expert_dim=-1), "expert_dim"),
    (dict(prelude_layers=-1), "prelude_layers"),
    (dict(max_loop_iters=0), "max_loop_iters"),
    (dict(attn_type="mha"), "attn_type"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(act_threshold=0.0), "act_threshold"),
    (dict(dim=64.0), "dim"),
    (dict(dtype="float16"), "dtype"),
    (dict(moe_impl="magic"), "moe_impl"),
    (dict(loop_remat="some"), "loop_remat"),
    (dict(injection="sum"), "injection"),
    (dict(loop_embed_scale=-1.0), "loop_embed_scale"),
    (dict(loop_embed_scale=float("inf")), "loop_embed_scale"),
])
def test_invalid_values_name_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"MythosConfig\.{field}:"):
        MythosConfig(**changes)


def test_gqa_rules_do_not_apply_to_mla():
    assert MythosConfig(n_kv_heads=5).n_kv_heads == 5  # ignored by MLA, as in OpenMythos


def test_json_round_trip_and_unknown_fields():
    cfg = MythosConfig(dim=256, n_heads=4, attn_type="gqa", dtype="bfloat16")
    assert MythosConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        MythosConfig.from_dict({"dim": 64, "n_layers": 3})


def test_parse_override_types_values_by_field():
    from mythos_jax.config import parse_override

    assert parse_override("dim=128") == ("dim", 128)
    assert parse_override("act_threshold = 0.5") == ("act_threshold", 0.5)
    assert parse_override("attn_type=gqa") == ("attn_type", "gqa")
    assert parse_override("readout=true") == ("readout", True)
    for bad, match in [("dim", "FIELD=VALUE"), ("depth=3", "unknown MythosConfig field"),
                       ("dim=1.5", "expected a int"), ("readout=yes", "true or false")]:
        with pytest.raises(ValueError, match=match):
            parse_override(bad)
