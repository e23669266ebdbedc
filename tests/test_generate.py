"""Generation: cached prefill/decode against the full forward, OpenMythos's greedy decoding,
compile-once, sampling, EOS and argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from mythos_jax import OpenMythos, variants
from mythos_jax.inference import generate as gen
from mythos_jax.inference.cache import cache_values_per_token, init_cache
from mythos_jax.inference.sampling import sample_next
from mythos_jax.loops import LoopSpec
from mythos_jax.interop.parity import build_pair

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14]]


@pytest.fixture(scope="module", params=["mla", "gqa"])
def model(request):
    m = OpenMythos(variants.tiny_mla(attn_type=request.param), rngs=nnx.Rngs(0))
    m.recurrent.act.halt.bias[...] = jnp.full((1,), -1.0)   # positions halt at different loops
    m.eval()
    return m


def test_prefill_into_a_used_cache_raises(model):
    cache = init_cache(model.cfg, 1, 8, 1)
    cache = model(jnp.asarray([[1, 2]]), 1, cache=cache).cache
    with pytest.raises(ValueError, match="needs an empty cache"):
        model(jnp.asarray([[3, 4]]), 1, cache=cache)


@pytest.mark.parametrize("n_loops", [1, 3])
def test_cached_decode_equals_full_forward_with_padding(model, n_loops):
    continuation = [[1, 2, 3, 4], [9, 8, 7, 6], [3, 3, 3, 3]]
    ids, start = gen.left_pad(PROMPTS)
    cache = init_cache(model.cfg, len(PROMPTS), 16, n_loops, start)
    prefill_logits, _, cache = model(jnp.asarray(ids), n_loops, cache=cache)
    decoded = []
    for step in range(4):
        token = jnp.asarray([[c[step]] for c in continuation])
        logits, _, cache = model(token, n_loops, cache=cache)
        decoded.append(logits[:, 0])
    decoded = np.stack(decoded, axis=1)
    for b, prompt in enumerate(PROMPTS):
        full = np.asarray(model(jnp.asarray([prompt + continuation[b]]), n_loops))[0]
        pad = ids.shape[1] - len(prompt)
        np.testing.assert_allclose(prefill_logits[b, pad:], full[:len(prompt)], atol=2e-5)
        np.testing.assert_allclose(decoded[b], full[len(prompt):], atol=2e-5)


def test_cache_holds_latent_and_one_rope_key_per_token():
    cfg = variants.tiny_mla()
    cache = init_cache(cfg, 2, 10, 3)
    assert cache.recurrent["c_kv"].shape == (3, 2, 10, cfg.kv_lora_rank)
    assert cache.recurrent["k_rope"].shape == (3, 2, 10, cfg.qk_rope_head_dim)
    layers = (cache.prelude, cache.recurrent, cache.coda)
    per_token = sum(x.size for x in jax.tree.leaves(layers)) // (2 * 10)
    assert per_token == cache_values_per_token(cfg, 3) == (16 + 8) * (1 + 3 + 1)


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_greedy_generation_equals_openmythos(attn_type):
    torch_model, jax_model = build_pair(attn_type)
    n_loops, new_tokens = 3, 8
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    result = gen.generate(jax_model, prompts, new_tokens, n_loops=n_loops, temperature=0.0)
    for b, prompt in enumerate(prompts):
        sequence = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(new_tokens):
                next_id = torch_model(sequence, n_loops=n_loops)[:, -1].argmax(-1, keepdim=True)
                sequence = torch.cat([sequence, next_id], dim=1)
        assert result.tokens[b].tolist() == sequence[0, len(prompt):].tolist()
    np.testing.assert_array_equal(result.lengths, [new_tokens] * 2)


def test_prefill_and_decode_compile_once(model):
    gen.generate(model, PROMPTS, 3, n_loops=2, temperature=0.0)
    decoder = gen.compiled_decoder(nnx.graphdef(model), 2, 0.0, None, None, None, 1e-3)
    sizes = decoder.prefill._cache_size(), decoder.run._cache_size()
    assert sizes == (1, 1)
    gen.generate(model, [[1, 2], [3], [4, 5, 6, 7, 8]], 3, n_loops=2, temperature=0.0,
                 max_len=9)
    assert (decoder.prefill._cache_size(), decoder.run._cache_size()) == sizes
    # The on-device decode loop serves every max_new_tokens (the prefill's budget changes).
    gen.generate(model, [[1], [2], [3]], 6, n_loops=2, temperature=0.0, max_len=9)
    assert decoder.run._cache_size() == 1


def test_decode_early_exit_per_sequence(model):
    full = gen.generate(model, PROMPTS, 6, n_loops=8, temperature=0.0)
    np.testing.assert_array_equal(full.loops, 8)
    act = gen.generate(model, PROMPTS, 6, n_loops=8, temperature=0.0, exit="act")
    assert (act.loops >= 1).all() and (act.loops <= 8).all() and (act.loops < 8).any()
    # The prompt's ACT exit leaves the output unchanged: the first token is the same.
    np.testing.assert_array_equal(act.tokens[:, 0], full.tokens[:, 0])
    # A rule that never fires runs every loop and reproduces the full-depth generation.
    never = gen.generate(model, PROMPTS, 6, n_loops=8, temperature=0.0, exit="delta",
                         exit_threshold=0.0)
    np.testing.assert_array_equal(never.tokens, full.tokens)
    np.testing.assert_array_equal(never.loops, 8)


def test_early_exit_fills_every_depth_of_the_cache(model):
    ids, start = gen.left_pad(PROMPTS)
    cache = init_cache(model.cfg, len(PROMPTS), 12, 8, start)
    cache = model(jnp.asarray(ids), 8, cache=cache).cache
    slot = int(cache.index)
    out = model(jnp.asarray([[1], [2], [3]]), LoopSpec(8, exit="act"), cache=cache,
                return_info=True)
    cache, loops_run = out.cache, out.info.loops_run
    assert int(loops_run.max()) < 8
    for array in cache.recurrent.values():          # (depth, B, S, ...)
        written = np.abs(np.asarray(array[:, :, slot])).reshape(8, -1).sum(axis=1)
        assert (written > 0).all()


def test_depth_shared_cache(model):
    full = gen.generate(model, PROMPTS, 5, n_loops=4, temperature=0.0)
    same = gen.generate(model, PROMPTS, 5, n_loops=4, temperature=0.0, depth_slots=4)
    np.testing.assert_array_equal(same.tokens, full.tokens)   # 4 slots for 4 loops: no sharing
    shared = gen.generate(model, PROMPTS, 5, n_loops=4, temperature=0.0, depth_slots=1)
    np.testing.assert_array_equal(shared.tokens[:, 0], full.tokens[:, 0])  # prefill unchanged
    ids, start = gen.left_pad(PROMPTS)
    full_cache = init_cache(model.cfg, 3, 8, 4, start)
    shared_cache = init_cache(model.cfg, 3, 8, 1, start, shares_depths=True)
    expected, _, full_cache = model(jnp.asarray(ids), 4, cache=full_cache)
    prefill, _, shared_cache = model(jnp.asarray(ids), 4, cache=shared_cache)
    np.testing.assert_allclose(prefill, expected, atol=1e-6)  # prefill reads no cache
    token = jnp.asarray([[1], [2], [3]])
    exact = model(token, 4, cache=full_cache).logits
    step, _, shared_cache = model(token, 4, cache=shared_cache)
    assert next(iter(shared_cache.recurrent.values())).shape[0] == 1
    assert np.isfinite(np.asarray(step)).all() and not np.allclose(step, exact, atol=1e-4)
    with pytest.raises(ValueError, match="depth_slots must be in"):
        gen.generate(model, PROMPTS, 2, n_loops=4, depth_slots=5)


def test_eos_stops_each_sequence(model):
    greedy = gen.generate(model, PROMPTS, 6, n_loops=2, temperature=0.0)
    eos = int(greedy.tokens[0, 1])
    result = gen.generate(model, PROMPTS, 6, n_loops=2, temperature=0.0, eos_id=eos)
    for b in range(len(PROMPTS)):
        row = greedy.tokens[b].tolist()
        expected = row.index(eos) + 1 if eos in row else 6
        assert result.lengths[b] == expected
        assert result.tokens[b, :expected].tolist() == row[:expected]
        assert (result.tokens[b, expected:] == eos).all()


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    key = jax.random.key(0)
    greedy = sample_next(logits, key, 0.0, None, None)
    assert (greedy == 0).all()
    top1 = sample_next(logits, key, 1.0, 1, None)
    assert (top1 == 0).all()
    top2 = np.asarray(sample_next(logits, key, 1.0, 2, None))
    assert set(top2.tolist()) == {0, 1} and abs((top2 == 0).mean() - 0.5 / 0.8) < 0.05
    nucleus = np.asarray(sample_next(logits, key, 1.0, None, 0.7))   # {0.5, 0.3} reach 0.7
    assert set(nucleus.tolist()) == {0, 1}
    np.testing.assert_array_equal(nucleus, sample_next(logits, key, 1.0, None, 0.7))


def test_decoding_deeper_than_the_cache_raises(model):
    cache = init_cache(model.cfg, 1, 8, 2)
    for n_loops in (1, 3):
        with pytest.raises(ValueError, match="n_loops must equal the 2 loop depths"):
            model(jnp.asarray([[1, 2]]), n_loops, cache=cache)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_len=4), "prompt length 6 does not fit the cache length 4"),
    (dict(max_len=8), "overflows the cache length 8"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(eos_id=256), "eos_id 256 is outside the vocabulary"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
])
def test_bad_generation_arguments_raise(model, kwargs, match):
    args = dict(max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=match):
        gen.generate(model, PROMPTS, **args)


def test_cache_longer_than_max_seq_len_raises(model):
    with pytest.raises(ValueError, match="max_seq_len 64"):
        gen.generate(model, PROMPTS, 60)
    with pytest.raises(ValueError, match="outside \\[0, vocab_size=256\\)"):
        gen.generate(model, [[1, 300]], 2)
