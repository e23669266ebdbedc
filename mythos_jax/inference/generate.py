"""Text generation with preallocated caches: a jitted prefill, then decoding on the device.

    result = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32, temperature=0.0)
    result.tokens   # (B, max_new_tokens) int32, eos_id (or 0) after a sequence ended
    result.lengths  # (B,) new tokens per sequence, EOS included
    turn = generate(model, [[4, 5], [6]], 32, context=result.context)   # with keep_cache=True

Prompts of different lengths are left-padded to the prompt budget ``max_len - max_new_tokens``;
each sequence sees only its own tokens (padding masks) and its positions start at 0.
The decode loop (a ``while_loop`` over tokens, sampling included) is compiled once per
(batch, cache length, loops, sampling settings, chunk) and the prefill once per (batch,
prompt budget, ...), never per token or per prompt length; the host sees one call and one
(chunk, B) transfer per chunk of tokens. A conversation goes on from ``Generation.context``:
the next turn's tokens are appended to each sequence after its own last token (right-padded
to a power of two, so a handful of programs serve every turn), and the cache is kept.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mythos_jax.budget import check_fits, tree_bytes
from mythos_jax.inference.cache import KVCache, init_cache
from mythos_jax.inference.sampling import check_sampling_args, sample_next
from mythos_jax.loops import LoopSpec, resolve_spec
from mythos_jax.model import raise_if_out_of_vocab


class Context(NamedTuple):
    """Where a conversation stands after a turn: the cache of every token so far but the
    last generated one of each sequence, ``pending`` (B,), which the next turn feeds first."""
    cache: KVCache
    pending: np.ndarray   # (B,) int32


class Generation(NamedTuple):
    tokens: np.ndarray    # (B, max_new_tokens) int32
    lengths: np.ndarray   # (B,) int32: tokens generated per sequence (EOS included)
    loops: np.ndarray     # (B, max_new_tokens) int32: loops run for each token
    context: Context | None = None   # with keep_cache (or a context given): the next turn's


def left_pad(prompts: Sequence[Sequence[int]] | np.ndarray, width: int | None = None,
             pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Prompts (token lists, or a (B, P) array) -> (B, width) int32 left-padded ids and the
    (B,) first real slot of each. ``width`` defaults to the longest prompt."""
    if hasattr(prompts, "shape"):
        array = np.asarray(prompts)
        if array.ndim != 2:
            raise ValueError(f"prompts must be a (batch, length) array or a list of token "
                             f"lists, got shape {array.shape}")
        prompts = array.tolist()
    lengths = [len(p) for p in prompts]
    if not lengths or min(lengths) == 0:
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    width = max(lengths) if width is None else width
    if max(lengths) > width:
        raise ValueError(f"prompt length {max(lengths)} does not fit the cache length "
                         f"{width} left after max_new_tokens")
    ids = np.full((len(prompts), width), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
    return ids, np.asarray([width - n for n in lengths], np.int32)


#: Tokens per on-device decode call without ``on_token`` (one compile serves every
#: ``max_new_tokens``; a longer generation takes several calls, each one host round trip).
DECODE_CHUNK = 64


class DecodeState(NamedTuple):
    """What the on-device decode loop carries from one token to the next."""
    token: jax.Array      # (B,) int32: the last recorded token, the next forward's input
    finished: jax.Array   # (B,) bool: the sequence has emitted ``eos_id``
    lengths: jax.Array    # (B,) int32: tokens recorded per sequence (EOS included)
    cache: KVCache


class Decoder(NamedTuple):
    """Jitted generation steps for one (graphdef, LoopSpec, sampling settings); all donate
    the cache.
    ``prefill(state, ids (B, P), cache, key, lengths)`` -> ``(next_token (B,), last logits
    (B, V), cache, loops run (B,))``: left-padded prompts into an empty cache (``lengths``
    None), or a turn's right-padded tokens, ``lengths`` (B,) of them, into a filled one.
    ``step(state, token (B,), cache, key, lengths)`` -> the same, for one token per sequence
    (``lengths`` (B,) 0 or 1: a finished sequence's cache does not advance).
    ``run(state, carry, key, start, stop, eos, size=C)`` -> ``(carry, tokens (C, B),
    loops (C, B), end)``: tokens ``start..stop-1`` (at most C) in one on-device
    ``while_loop``, which ends early (at ``end``) once every sequence is finished; token i
    samples with ``fold_in(key, i)``; ``eos`` < 0 means none."""
    prefill: Callable
    step: Callable
    run: Callable


def compiled_decoder(graphdef, spec: LoopSpec, temperature: float = 0.0,
                     top_k: int | None = None, top_p: float | None = None) -> Decoder:
    """The :class:`Decoder` for these settings (``spec``: a static count, its exit rule if
    any: see :func:`decode_spec`); built once per distinct settings (the graphdef is hashed
    here, once per ``generate`` call, not per token), compiled once per (batch, cache
    length)."""
    return decoder_by_value(graphdef, spec.count, spec.exit, spec.threshold, temperature, top_k,
                            top_p)


@functools.lru_cache(maxsize=32)
def decoder_by_value(graphdef, count: int, exit, threshold: float, temperature: float,
                     top_k: int | None, top_p: float | None) -> Decoder:
    """``compiled_decoder`` keyed by value (a LoopSpec compares by identity)."""
    spec = LoopSpec(count, exit=exit, threshold=threshold)

    def forward(state, ids, cache, key, lengths=None):
        out = nnx.merge(graphdef, state)(ids, spec, cache=cache, lengths=lengths,
                                         last_only=True, return_info=True)
        logits = out.logits[:, -1]
        return (sample_next(logits, key, temperature, top_k, top_p), logits, out.cache,
                out.info.loops_run)

    def step(state, token, cache, key, lengths=None):
        return forward(state, token[:, None], cache, key, lengths)

    def run(state, carry: DecodeState, key, start, stop, eos, size: int):
        fill = jnp.maximum(eos, 0)

        def body(loop):
            index, carry, tokens, loops = loop
            token, _, cache, loops_run = step(state, carry.token, carry.cache,
                                              jax.random.fold_in(key, index),
                                              (~carry.finished).astype(jnp.int32))
            recorded = jnp.where(carry.finished, fill, token)
            slot = index - start
            tokens = tokens.at[slot].set(recorded)
            loops = loops.at[slot].set(jnp.where(carry.finished, 0, loops_run))
            carry = DecodeState(recorded, carry.finished | ((eos >= 0) & (recorded == eos)),
                                carry.lengths + ~carry.finished, cache)
            return index + 1, carry, tokens, loops

        def more(loop):
            index, carry = loop[:2]
            return (index < stop) & ~jnp.all(carry.finished)

        batch = carry.token.shape[0]
        empty = jnp.full((size, batch), fill, jnp.int32)
        end, carry, tokens, loops = jax.lax.while_loop(
            more, body, (start, carry, empty, jnp.zeros_like(empty)))
        return carry, tokens, loops, end

    return Decoder(jax.jit(forward, donate_argnames=("cache",)),
                   jax.jit(step, donate_argnames=("cache",)),
                   jax.jit(run, donate_argnames=("carry",), static_argnames=("size",)))


def check_generation_args(cfg, prompt_len: int, max_new_tokens: int, temperature: float = 1.0,
                          top_k: int | None = None, top_p: float | None = None,
                          eos_id: int | None = None, max_len: int | None = None) -> int:
    """``ValueError`` naming the first bad argument of :func:`generate`; returns the cache
    length (default: prompt_len + max_new_tokens, at most ``cfg.max_seq_len``)."""
    check_token_args(cfg, max_new_tokens, temperature, top_k, top_p, eos_id)
    if max_len is None:
        max_len = prompt_len + max_new_tokens
        if max_len > cfg.max_seq_len:
            raise ValueError(f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} "
                             f"exceeds the model's max_seq_len {cfg.max_seq_len}")
    if prompt_len >= max_len:
        raise ValueError(f"prompt length {prompt_len} does not fit the cache length {max_len}")
    if prompt_len + max_new_tokens > max_len:
        raise ValueError(f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} "
                         f"overflows the cache length {max_len}")
    return max_len


def check_token_args(cfg, max_new_tokens: int, temperature: float = 1.0,
                     top_k: int | None = None, top_p: float | None = None,
                     eos_id: int | None = None) -> None:
    """The checks of every turn: sampling settings, ``eos_id`` in the vocabulary,
    ``max_new_tokens`` >= 1 (``ValueError`` naming the argument)."""
    check_sampling_args(temperature, top_k, top_p)
    if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
        raise ValueError(f"eos_id {eos_id} is outside the vocabulary [0, {cfg.vocab_size})")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def decode_spec(cfg, loops: LoopSpec | int | None, n_loops: int | None = None) -> LoopSpec:
    """The LoopSpec every generated token runs (``LoopSpec.of``; count default
    ``cfg.max_loop_iters``): a static count, an exit rule allowed, nothing of training."""
    return resolve_spec(LoopSpec.of(loops, n_loops), cfg, cached=True)


def generate(model, prompts, max_new_tokens: int, loops: LoopSpec | int | None = None,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, seed: int = 0, max_len: int | None = None,
             on_token: Callable[[np.ndarray], None] | None = None,
             depth_slots: int | None = None, stream_chunk: int = 16, *,
             context: Context | None = None, keep_cache: bool = False,
             n_loops: int | None = None) -> Generation:
    """Sample ``max_new_tokens`` per prompt (greedy at ``temperature=0``), stopping each
    sequence at ``eos_id``. ``loops``: the loop count of every token, or a
    :class:`~mythos_jax.loops.LoopSpec` with an ``exit`` rule (``LoopSpec(8, exit="act")``):
    per-sequence early exit of the loop for every token (continuous depth-wise batching: a
    sequence that stopped is masked while the batch goes on; ``Generation.loops`` reports the
    loops run per token), trading exactness against the full-depth model for fewer loops
    (see ``OpenMythos.__call__``); ``n_loops`` is OpenMythos's name for it. ``max_len`` is
    the cache length (default: longest prompt + max_new_tokens; a conversation needs room
    for all its turns). ``on_token`` receives each step's tokens (B,) (streaming); the
    tokens are decoded on the device ``stream_chunk`` at a time, so they arrive in bursts of
    that many. ``depth_slots`` (off by default): a recurrent cache of that many depth slots
    shared by all loops (slot t mod depth_slots; 1 = one slot per token, Huginn-style),
    trading cache memory for a change in the next-token distribution.
    ``keep_cache``: return ``Generation.context`` to go on from; ``context`` (a previous
    turn's): ``prompts`` are the next turn's tokens of each sequence, appended after its
    own last token (the same loops, depth slots and sequences; max_len is the cache's)."""
    cfg = model.cfg
    spec = decode_spec(cfg, loops, n_loops)
    count = spec.count
    check_token_args(cfg, max_new_tokens, temperature, top_k, top_p, eos_id)
    if stream_chunk < 1:
        raise ValueError(f"stream_chunk must be >= 1, got {stream_chunk}")
    if depth_slots is not None and not 1 <= depth_slots <= count:
        raise ValueError(f"depth_slots must be in [1, loops={count}], got {depth_slots}")
    graphdef, state = nnx.split(model)
    decoder = compiled_decoder(graphdef, spec, float(temperature), top_k, top_p)
    key = jax.random.key(seed)
    if context is None:
        cache, ids, lengths = _first_turn(cfg, prompts, max_new_tokens, count, max_len,
                                          depth_slots)
    else:
        cache, ids, lengths = _next_turn(cfg, spec, context, prompts, max_new_tokens, max_len,
                                         depth_slots)
    token, _, cache, loops_run = decoder.prefill(state, jnp.asarray(ids), cache,
                                                 jax.random.fold_in(key, 0), lengths)
    result, cache = _decode(decoder, state, token, loops_run, cache, key, max_new_tokens,
                            eos_id, stream_chunk if on_token is not None else DECODE_CHUNK,
                            on_token)
    if not (keep_cache or context is not None):
        return result
    pending = result.tokens[np.arange(len(result.lengths)), result.lengths - 1]
    return result._replace(context=Context(cache, pending))


def _first_turn(cfg, prompts, max_new_tokens: int, count: int, max_len, depth_slots):
    """A new cache and the prompts left-padded for it (lengths None) to the next power of
    two, at most the prompt budget ``max_len - max_new_tokens``: prefill compiles once per
    (batch, max_len, max_new_tokens, bucket), and a conversation keeps its room."""
    longest = max(len(p) for p in prompts) if not hasattr(prompts, "shape") else prompts.shape[1]
    max_len = check_generation_args(cfg, longest, max_new_tokens, max_len=max_len)
    ids, start = left_pad(prompts, width=bucket_length(longest, max_len - max_new_tokens))
    raise_if_out_of_vocab(ids.min(), ids.max(), cfg.vocab_size)
    batch = ids.shape[0]
    slots, shared = depth_slots or count, depth_slots is not None
    check_fits("the KV cache", tree_bytes(jax.eval_shape(
        lambda: init_cache(cfg, batch, max_len, slots, start, shares_depths=shared))),
        f"lower loops={count} (or set depth_slots), the batch {batch} or max_len={max_len}")
    return init_cache(cfg, batch, max_len, slots, start, shares_depths=shared), ids, None


def _next_turn(cfg, spec: LoopSpec, context: Context, prompts, max_new_tokens: int, max_len,
               depth_slots):
    """The context's cache and each sequence's pending token + its next-turn tokens,
    right-padded to a power of two (B, W), with their (B,) lengths; ``ValueError`` when
    they, or the new tokens after them, overflow the cache."""
    cache = context.cache
    resolve_spec(spec, cfg, cached=True, depth_slots=cache.depth_slots,
                 shares_depths=cache.shares_depths)
    if max_len is not None and max_len != cache.max_len:
        raise ValueError(f"max_len {max_len} differs from the context's cache length "
                         f"{cache.max_len}; a conversation keeps its cache")
    if depth_slots is not None and depth_slots != cache.depth_slots:
        raise ValueError(f"depth_slots {depth_slots} differs from the context's "
                         f"{cache.depth_slots}")
    turns = [list(p) for p in (prompts.tolist() if hasattr(prompts, "shape") else prompts)]
    if len(turns) != len(context.pending):
        raise ValueError(f"the context holds {len(context.pending)} sequences, got "
                         f"{len(turns)} prompts")
    tokens = [[int(t)] + turn for t, turn in zip(context.pending, turns)]
    lengths = np.asarray([len(t) for t in tokens], np.int32)
    index = np.asarray(cache.index)
    room = cache.max_len - int((index + lengths).max()) + 1
    if room < max_new_tokens:
        raise ValueError(f"the conversation's cache ({cache.max_len} slots) has room for "
                         f"{max(room, 0)} more new tokens after this turn, not "
                         f"max_new_tokens={max_new_tokens}: start it with a larger max_len")
    fits = cache.max_len - int(index.max())          # the padded turn is written whole
    if lengths.max() > fits:
        raise ValueError(f"this turn's {int(lengths.max())} tokens (the pending one included) "
                         f"do not fit the {fits} slots left to the longest conversation: "
                         f"start it with a larger max_len")
    width = bucket_length(int(lengths.max()), fits)
    ids = np.zeros((len(tokens), width), np.int32)
    for row, row_tokens in enumerate(tokens):
        ids[row, :len(row_tokens)] = row_tokens
    raise_if_out_of_vocab(ids.min(), ids.max(), cfg.vocab_size)
    return cache, ids, jnp.asarray(lengths)


def bucket_length(length: int, cap: int, lowest: int = 1) -> int:
    """The length ``length`` tokens are padded to, so that a handful of programs serve every
    length: the smallest power of two >= it (at least ``lowest``), at most ``cap``."""
    return min(max(1 << max(length - 1, 0).bit_length(), lowest), cap)


def _decode(decoder: Decoder, state, token, loops_run, cache, key, max_new_tokens: int,
            eos_id: int | None, chunk: int, on_token) -> Generation:
    """Records the prefill's token (B,), then decodes the rest on the device, ``chunk``
    tokens per call, until ``max_new_tokens`` or every sequence reached ``eos_id``; returns
    the Generation and the final cache."""
    batch = token.shape[0]
    tokens = np.full((batch, max_new_tokens), 0 if eos_id is None else eos_id, np.int32)
    loops = np.zeros((batch, max_new_tokens), np.int32)
    tokens[:, 0], loops[:, 0] = np.asarray(token), np.asarray(loops_run)
    finished = np.zeros((batch,), bool) if eos_id is None else tokens[:, 0] == eos_id
    if on_token is not None:
        on_token(tokens[:, 0].copy())
    carry = DecodeState(jnp.asarray(tokens[:, 0]), jnp.asarray(finished),
                        jnp.ones((batch,), jnp.int32), cache)
    eos = jnp.int32(-1 if eos_id is None else eos_id)
    done = 1
    while done < max_new_tokens and not finished.all():
        carry, new_tokens, new_loops, end = decoder.run(
            state, carry, key, jnp.int32(done), jnp.int32(min(done + chunk, max_new_tokens)),
            eos, size=chunk)
        end = int(end)
        tokens[:, done:end] = np.asarray(new_tokens)[:end - done].T
        loops[:, done:end] = np.asarray(new_loops)[:end - done].T
        finished = np.asarray(carry.finished)
        if on_token is not None:
            for column in tokens[:, done:end].T:
                on_token(column.copy())
        done = end
    return Generation(tokens, np.asarray(carry.lengths), loops), carry.cache
