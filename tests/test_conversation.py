"""Caches that go on: chunked prefill, a conversation's next turn, left padding without a
cache, and exit rules that decide on real tokens only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mythos_jax import OpenMythos, variants
from mythos_jax.inference import generate as gen
from mythos_jax.inference.cache import init_cache
from mythos_jax.loops import LoopSpec
from numerics import assert_close, relative_error

# A cached forward against the uncached one (fp32): 1e-5 relative to max |logit|.
RTOL = 1e-5
LOOPS = 3
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]


@pytest.fixture(scope="module", params=["mla", "gqa"])
def model(request):
    m = OpenMythos(variants.tiny_mla(attn_type=request.param), rngs=nnx.Rngs(0))
    m.eval()
    return m


@pytest.fixture(scope="module")
def exiting_model():
    """Halting that depends on the token (halt weights x100, bias -10): in one batch,
    PROMPTS stop after 2, 3 and 8 loops."""
    m = OpenMythos(variants.tiny_mla(), rngs=nnx.Rngs(0))
    m.recurrent.act.halt.kernel[...] *= 100.0
    m.recurrent.act.halt.bias[...] = jnp.full((1,), -10.0)
    m.eval()
    return m


def _chunked_logits(model, prompts, cuts, loops, depth_slots=None):
    """Left-padded ``prompts`` prefilled in chunks (the first into the empty cache, the others
    right-padded with ``lengths``: each sequence's chunk c is its tokens cuts[c]..cuts[c+1]
    counted from its own end of the padding, so chunks are ragged): each sequence's logits
    at its real tokens, (len,) arrays in a list."""
    first = cuts[1]
    ids, start = gen.left_pad([p[:first] for p in prompts])
    slots = depth_slots or loops
    cache = init_cache(model.cfg, len(prompts), 32, slots, start,
                       shares_depths=depth_slots is not None)
    forward = nnx.jit(lambda m, ids, cache, lengths: m(ids, loops, cache=cache, lengths=lengths))
    out = forward(model, jnp.asarray(ids), cache, None)
    rows = [[out.logits[b, ids.shape[1] - len(p[:first]):]] for b, p in enumerate(prompts)]
    for lo, hi in zip(cuts[1:-1], cuts[2:]):
        chunks = [p[lo:hi] for p in prompts]
        lengths = np.asarray([len(c) for c in chunks], np.int32)
        ids = np.zeros((len(prompts), max(lengths.max(), 1)), np.int32)
        for b, chunk in enumerate(chunks):
            ids[b, :len(chunk)] = chunk
        out = forward(model, jnp.asarray(ids), out.cache, jnp.asarray(lengths))
        for b, n in enumerate(lengths):
            rows[b].append(out.logits[b, :n])
    return [np.concatenate(r) for r in rows]


def _uncached(model, prompt) -> jax.Array:
    """The uncached forward of one prompt at LOOPS: (len, vocab) logits."""
    return _forward(model, jnp.asarray([prompt]))[0]


_forward = nnx.jit(lambda model, ids: model(ids, LOOPS))


@pytest.mark.parametrize("cuts, shared", [((0, 3, 7), False), ((0, 2, 4, 7), False),
                                          ((0, 2, 4, 7), True)],
                         ids=["2 chunks", "3 chunks", "3 chunks, shared slots"])
def test_chunked_prefill_equals_the_uncached_forward(model, cuts, shared):
    """Prompts of 7, 3 and 5 tokens prefilled in 2 or 3 ragged chunks (a sequence may have
    no tokens in a chunk): every real token's logits equal the uncached forward (1 chunk:
    test_generate's cached prefill). Shared slots here: ``shares_depths`` with a slot per
    loop (a cache with fewer slots than loops sees an earlier chunk's tokens through the
    slot's last depth, by design: see the next test)."""
    got = _chunked_logits(model, PROMPTS, cuts, LOOPS, LOOPS if shared else None)
    for b, prompt in enumerate(PROMPTS):
        assert_close(got[b], _uncached(model, prompt), RTOL, str(prompt))


def test_fewer_depth_slots_than_loops_first_chunk_exact_later_chunks_shared(model):
    """With 2 slots for 3 loops, the first chunk is the uncached forward (its queries attend
    over their own tokens at every depth); a later chunk reads the earlier tokens through
    the shared slot, which holds its last writer's keys: no longer the full-depth forward."""
    got = _chunked_logits(model, PROMPTS, (0, 3, 7), LOOPS, depth_slots=2)
    for b, prompt in enumerate(PROMPTS):
        full = _uncached(model, prompt)
        first = min(len(prompt), 3)
        assert_close(got[b][:first], full[:first], RTOL, str(prompt))
        if len(prompt) > 3:
            assert relative_error(got[b][first:], full[first:]) > 10 * RTOL   # ~1e-3 seen


def test_two_turns_equal_one_generation_over_the_conversation(model):
    """Greedy: turn 1 on ragged prompts (with an EOS that ends one sequence early while the
    others run to max_new_tokens), turn 2 appends ragged user tokens after each sequence's
    own end; every sequence's turn-2 tokens equal a fresh generation over its whole
    conversation (prompt, turn-1 output up to its end, turn-2 tokens), token for token."""
    kwargs = dict(loops=LOOPS, temperature=0.0)
    eos_id = int(gen.generate(model, PROMPTS, 3, **kwargs).tokens[1, 2])
    first = gen.generate(model, PROMPTS, 5, eos_id=eos_id, max_len=40, keep_cache=True,
                         **kwargs)
    assert first.lengths.min() < 5 and first.lengths.max() == 5, first.lengths
    user = [[20, 21], [22, 23, 24, 25], [26]]
    second = gen.generate(model, user, 4, eos_id=eos_id, context=first.context, **kwargs)
    for b, prompt in enumerate(PROMPTS):
        said = first.tokens[b, :first.lengths[b]].tolist()
        alone = gen.generate(model, [prompt + said + user[b]], 4, eos_id=eos_id, max_len=40,
                             **kwargs)
        np.testing.assert_array_equal(second.tokens[b], alone.tokens[0], str(b))
        assert second.lengths[b] == alone.lengths[0]
    # A third turn goes on from the second's context.
    third = gen.generate(model, [[1], [2], [3]], 2, context=second.context, **kwargs)
    assert third.tokens.shape == (3, 2) and third.context is not None


def test_a_turn_that_overflows_the_cache_is_refused(model):
    first = gen.generate(model, PROMPTS, 3, loops=LOOPS, temperature=0.0, keep_cache=True)
    with pytest.raises(ValueError, match="has room for 0 more new tokens"):
        gen.generate(model, [[1], [2], [3]], 2, loops=LOOPS, context=first.context)
    with pytest.raises(ValueError, match="holds 3 sequences, got 2 prompts"):
        gen.generate(model, [[1], [2]], 1, loops=LOOPS, context=first.context)
    with pytest.raises(ValueError, match="loops must equal the 3 depth slots"):
        gen.generate(model, [[1], [2], [3]], 1, loops=2, context=first.context)


def test_left_padding_without_a_cache_is_the_unpadded_forward(model):
    ids, start = gen.left_pad(PROMPTS)
    logits = model(jnp.asarray(ids), LOOPS, start=jnp.asarray(start))
    for b, prompt in enumerate(PROMPTS):
        assert_close(logits[b, start[b]:], _uncached(model, prompt), RTOL, str(prompt))


@pytest.mark.parametrize("padding", ["left", "right"])
def test_exit_rules_decide_on_real_tokens_only(exiting_model, padding):
    """An exit rule's loops for a padded batch (left padding with ``start``, right padding
    with ``lengths``) equal each sequence's own, unpadded: padding never votes."""
    model, spec = exiting_model, LoopSpec(8, exit="act")
    alone = [int(model(jnp.asarray([p]), spec, return_info=True).info.loops_run[0])
             for p in PROMPTS]
    assert len(set(alone)) > 1, alone                 # sequences stop at different loops
    if padding == "left":
        ids, start = gen.left_pad(PROMPTS)
        out = model(jnp.asarray(ids), spec, start=jnp.asarray(start), return_info=True)
    else:
        ids = np.zeros((len(PROMPTS), 7), np.int32)
        for b, p in enumerate(PROMPTS):
            ids[b, :len(p)] = p
        out = model(jnp.asarray(ids), spec, lengths=jnp.asarray([len(p) for p in PROMPTS]),
                    return_info=True)
    np.testing.assert_array_equal(out.info.loops_run, alone)


def test_a_stopped_sequence_keeps_its_shared_depth_slots(exiting_model):
    """Exit rule with 2 depth slots shared by 8 loops: each sequence's cache rows after the
    prefill equal those of a batch of copies of it, whatever its batch-mates still run (the
    write gate of ``loops.drivers._write_depth``: without it a stopped sequence's slot t mod 2
    is overwritten by its frozen state's keys at a later loop index)."""
    model, spec = exiting_model, LoopSpec(8, exit="act")
    ids, start = gen.left_pad(PROMPTS)

    def prefill(rows):
        cache = init_cache(model.cfg, len(rows), 16, 2, start[rows], shares_depths=True)
        return model(jnp.asarray(ids[rows]), spec, cache=cache, return_info=True)

    batch = prefill(np.arange(len(PROMPTS)))
    loops_run = np.asarray(batch.info.loops_run)
    # One sequence runs >= 2 loops after another stopped at >= 2: the loop goes on over
    # the stopped one's filled slots (a stop at 1 loop would be rewritten by the fill).
    assert loops_run.min() >= 2 and loops_run.max() >= loops_run.min() + 2, loops_run
    for b in range(len(PROMPTS)):
        alone = prefill(np.full(len(PROMPTS), b))
        for name, array in batch.cache.recurrent.items():       # (slots, B, S, ...)
            np.testing.assert_allclose(array[:, b], alone.cache.recurrent[name][:, 0],
                                       rtol=1e-6, atol=1e-6, err_msg=f"{name} of {b}")


def test_bad_start_and_lengths_are_named(model):
    ids = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(ValueError, match=r"start must be a \(2,\) integer array"):
        model(ids, 1, start=jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match=r"lengths must be in \[0, 4\]"):
        model(ids, 1, lengths=jnp.asarray([1, 5]))
    with pytest.raises(ValueError, match="start is for a forward without cache"):
        model(ids, 1, cache=init_cache(model.cfg, 2, 8, 1), start=jnp.zeros((2,), jnp.int32))


def test_a_cached_forward_takes_its_loop_count_from_the_cache(model):
    """No loops given: a cache of 2 depth slots runs 2 loops (not max_loop_iters=4); a
    cache that shares its slots takes the config's count."""
    ids = jnp.asarray([[1, 2, 3]])
    own = model(ids, cache=init_cache(model.cfg, 1, 8, 2), return_info=True)
    assert model.cfg.max_loop_iters == 4 and own.info.loops_run.tolist() == [2]
    assert_close(own.logits[0], nnx.jit(lambda m: m(ids, 2))(model)[0], RTOL)
    shared = model(ids, cache=init_cache(model.cfg, 1, 8, 2, shares_depths=True),
                   return_info=True)
    assert shared.info.loops_run.tolist() == [4]

