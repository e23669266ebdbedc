"""Text generation with preallocated caches: a jitted prefill and a jitted one-token decode.

    result = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32, temperature=0.0)
    result.tokens   # (B, max_new_tokens) int32, eos_id (or 0) after a sequence ended
    result.lengths  # (B,) new tokens per sequence, EOS included

Prompts of different lengths are left-padded to the prompt budget ``max_len - max_new_tokens``;
each sequence sees only its own tokens (padding masks) and its positions start at 0.
``decode_step`` is compiled once per (batch, cache length, n_loops, dtype) and ``prefill`` once
per (batch, prompt budget, n_loops, dtype), never per token or per prompt length.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mythos_jax.inference.cache import KVCache, init_cache
from mythos_jax.inference.sampling import check_sampling_args, sample_next
from mythos_jax.model import raise_if_out_of_vocab


class Generation(NamedTuple):
    tokens: np.ndarray    # (B, max_new_tokens) int32
    lengths: np.ndarray   # (B,) int32: tokens generated per sequence (EOS included)


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


@functools.partial(jax.jit, static_argnames=("graphdef", "n_loops"), donate_argnames=("cache",))
def prefill(graphdef, state, input_ids: jax.Array, cache: KVCache, n_loops: int):
    """Left-padded prompts (B, P) -> logits of the last position (B, V) and the filled cache."""
    logits, cache = nnx.merge(graphdef, state).forward_cached(input_ids, cache, n_loops)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "n_loops"), donate_argnames=("cache",))
def decode_step(graphdef, state, token: jax.Array, cache: KVCache, n_loops: int):
    """One new token per sequence (B,) -> next-token logits (B, V) and the updated cache."""
    logits, cache = nnx.merge(graphdef, state).forward_cached(token[:, None], cache, n_loops)
    return logits[:, -1], cache


def generate(model, prompts, max_new_tokens: int, n_loops: int | None = None,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, seed: int = 0, max_len: int | None = None,
             on_token: Callable[[np.ndarray], None] | None = None) -> Generation:
    """Sample ``max_new_tokens`` per prompt (greedy at ``temperature=0``), stopping each
    sequence at ``eos_id``. ``max_len`` is the cache length (default: longest prompt +
    max_new_tokens). ``on_token`` receives each step's tokens (B,) (streaming)."""
    cfg = model.cfg
    n_loops = cfg.max_loop_iters if n_loops is None else n_loops
    check_sampling_args(temperature, top_k, top_p)
    if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
        raise ValueError(f"eos_id {eos_id} is outside the vocabulary [0, {cfg.vocab_size})")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max(len(p) for p in prompts) if not hasattr(prompts, "shape") else prompts.shape[1]
    max_len = longest + max_new_tokens if max_len is None else max_len
    if longest >= max_len:
        raise ValueError(f"prompt length {longest} does not fit the cache length {max_len}")
    if longest + max_new_tokens > max_len:
        raise ValueError(f"prompt length {longest} + max_new_tokens {max_new_tokens} "
                         f"overflows the cache length {max_len}")
    # Prompts are padded to the whole prompt budget, so prefill compiles once per
    # (batch, max_len, max_new_tokens) whatever the prompt lengths.
    ids, start = left_pad(prompts, width=max_len - max_new_tokens)
    raise_if_out_of_vocab(ids.min(), ids.max(), cfg.vocab_size)
    batch = ids.shape[0]
    model.eval()
    graphdef, state = nnx.split(model)
    cache = init_cache(cfg, batch, max_len, n_loops, start)
    logits, cache = prefill(graphdef, state, jnp.asarray(ids), cache, n_loops)

    key = jax.random.key(seed)
    fill = 0 if eos_id is None else eos_id
    tokens = np.full((batch, max_new_tokens), fill, np.int32)
    finished = np.zeros((batch,), bool)
    lengths = np.zeros((batch,), np.int32)
    for step in range(max_new_tokens):
        key, step_key = jax.random.split(key)
        next_token = np.asarray(sample_next(logits, step_key, temperature, top_k, top_p))
        next_token = np.where(finished, fill, next_token)
        tokens[:, step] = next_token
        lengths += ~finished
        if on_token is not None:
            on_token(next_token)
        if eos_id is not None:
            finished |= next_token == eos_id
        if finished.all() or step == max_new_tokens - 1:
            break
        logits, cache = decode_step(graphdef, state, jnp.asarray(next_token), cache, n_loops)
    return Generation(tokens, lengths)
