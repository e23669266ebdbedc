"""MythosConfig.positions: RoPE everywhere (OpenMythos), outside the loop only, or nowhere."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mythos_jax import MythosConfig, OpenMythos, variants
from mythos_jax.inference import generate as gen
from mythos_jax.inference.cache import init_cache
from mythos_jax.interop.openmythos import (config_from_torch, load_state_dict,
                                           openmythos_fields, to_torch_state_dict)
from mythos_jax.train.config import load_train_config
from numerics import assert_close

IDS = jnp.asarray([[3, 1, 4, 1, 5, 9, 2, 6], [5, 3, 5, 8, 9, 7, 9, 3]])
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14]]
CONTINUATION = np.array([[1, 2, 3, 4], [9, 8, 7, 6], [3, 3, 3, 3]], np.int32)
DECODE_RTOL = 1e-5     # as tests/test_generate.py: the same sums in another order


def _logits(positions: str, rope_theta: float, **changes) -> np.ndarray:
    cfg = variants.tiny_mla(positions=positions, rope_theta=rope_theta, **changes)
    return np.asarray(OpenMythos(cfg, rngs=nnx.Rngs(0))(IDS, 3))


def test_rope_is_the_default_and_round_trips_through_configs():
    assert MythosConfig().positions == "rope"
    saved = variants.tiny_mla().to_dict()
    del saved["positions"]                                  # a config saved before the field
    assert MythosConfig.from_dict(saved).positions == "rope"
    cfg = variants.tiny_mla(positions="nope_loop")
    assert MythosConfig.from_json(cfg.to_json()) == cfg
    train = load_train_config("tiny", ["model.positions=nope"])
    assert train.model_config().positions == "nope"


def test_bad_positions_value_raises_one_line_naming_the_field():
    with pytest.raises(ValueError, match=r"^MythosConfig\.positions: must be one of "
                                         r"\('rope', 'nope_loop', 'nope'\), got 'alibi'$"):
        MythosConfig(positions="alibi")


@pytest.mark.parametrize("positions, theta_matters", [
    ("rope", True), ("nope_loop", True), ("nope", False)])
def test_rope_theta_matters_only_where_attention_rotates(positions, theta_matters):
    """Same weights, two rope_theta: "nope" gives the very same logits, "nope_loop" does not
    (its prelude and coda rotate)."""
    a, b = _logits(positions, 1e4), _logits(positions, 5e5)
    assert np.array_equal(a, b) != theta_matters


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_nope_loop_recurrent_block_ignores_positions(attn_type):
    """With no prelude and coda only the loop attends: "nope_loop" logits are the same at any
    rope_theta, "rope" logits are not."""
    bare = dict(attn_type=attn_type, prelude_layers=0, coda_layers=0)
    assert np.array_equal(_logits("nope_loop", 1e4, **bare), _logits("nope_loop", 5e5, **bare))
    assert not np.array_equal(_logits("rope", 1e4, **bare), _logits("rope", 5e5, **bare))


@pytest.mark.parametrize("positions", ["nope_loop", "nope"])
def test_export_to_openmythos_refuses_a_model_without_rope(positions):
    cfg = variants.tiny_mla(positions=positions)
    model = OpenMythos(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=f"positions='{positions}'") as err:
        to_torch_state_dict(model)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="positions="):
        load_state_dict(cfg, {})
    assert config_from_torch(openmythos_fields(cfg)).positions == "rope"


@pytest.mark.parametrize("positions, attn_type", [("nope_loop", "mla"), ("nope", "gqa")])
def test_cached_decode_equals_full_forward(positions, attn_type):
    """Left-padded prefill then teacher-forced decode (the cache holds unrotated loop keys)
    against the uncached forward of each whole sequence; greedy generate agrees too."""
    model = OpenMythos(variants.tiny_mla(attn_type=attn_type, positions=positions),
                       rngs=nnx.Rngs(0))
    model.eval()
    n_loops = 3
    ids, start = gen.left_pad(PROMPTS)
    forward = nnx.jit(lambda m, i, c: m(i, n_loops, cache=c))
    logits, _, cache = forward(model, jnp.asarray(ids), init_cache(model.cfg, len(PROMPTS), 16,
                                                                   n_loops, start))
    steps = [logits]
    for t in range(CONTINUATION.shape[1]):
        logits, _, cache = forward(model, jnp.asarray(CONTINUATION[:, t:t + 1]), cache)
        steps.append(logits)
    cached = np.concatenate(steps, axis=1)
    uncached = nnx.jit(lambda m, i: m(i, n_loops))
    for b, prompt in enumerate(PROMPTS):
        full = uncached(model, jnp.asarray([prompt + CONTINUATION[b].tolist()]))[0]
        assert_close(cached[b, ids.shape[1] - len(prompt):], full, DECODE_RTOL, prompt)

    result = gen.generate(model, PROMPTS[:2], 4, n_loops=n_loops, temperature=0.0)
    for b, prompt in enumerate(PROMPTS[:2]):
        sequence = list(prompt)
        for _ in range(4):
            sequence.append(int(np.argmax(uncached(model, jnp.asarray([sequence]))[0, -1])))
        assert result.tokens[b].tolist() == sequence[len(prompt):]
