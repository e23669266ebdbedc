"""Text generation with preallocated caches: a jitted prefill and a jitted one-token decode.

    result = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32, temperature=0.0)
    result.tokens   # (B, max_new_tokens) int32, eos_id (or 0) after a sequence ended
    result.lengths  # (B,) new tokens per sequence, EOS included

Prompts of different lengths are left-padded to the prompt budget ``max_len - max_new_tokens``;
each sequence sees only its own tokens (padding masks) and its positions start at 0.
The decode step is compiled once per (batch, cache length, n_loops, sampling settings) and
the prefill once per (batch, prompt budget, ...), never per token or per prompt length; both
sample on the device, so each token costs one jitted call and one (B,) transfer.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mythos_jax.budget import check_fits, tree_bytes
from mythos_jax.inference.cache import init_cache
from mythos_jax.inference.sampling import check_sampling_args, sample_next
from mythos_jax.loops import LoopSpec
from mythos_jax.model import raise_if_out_of_vocab


class Generation(NamedTuple):
    tokens: np.ndarray    # (B, max_new_tokens) int32
    lengths: np.ndarray   # (B,) int32: tokens generated per sequence (EOS included)
    loops: np.ndarray     # (B, max_new_tokens) int32: loops run for each token


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


class Decoder(NamedTuple):
    """Jitted generation steps for one (graphdef, n_loops, sampling, exit settings); each
    returns ``(next_token (B,), last logits (B, V), cache, loops run (B,))`` and donates the
    cache.
    ``prefill(state, ids (B, P), cache, key)``: left-padded prompts into an empty cache.
    ``step(state, token (B,), cache, key)``: one token per sequence."""
    prefill: Callable
    step: Callable


@functools.lru_cache(maxsize=32)
def compiled_decoder(graphdef, n_loops: int, temperature: float = 0.0,
                     top_k: int | None = None, top_p: float | None = None,
                     exit: str | None = None, exit_threshold: float = 1e-3) -> Decoder:
    """The :class:`Decoder` for these settings; built once (the graphdef is hashed here, once
    per ``generate`` call, not per token), compiled once per (batch, cache length)."""
    spec = LoopSpec(n_loops, exit=exit, threshold=exit_threshold)

    def forward(state, ids, cache, key):
        out = nnx.merge(graphdef, state)(ids, spec, cache=cache, last_only=True,
                                         return_info=True)
        logits = out.logits[:, -1]
        return (sample_next(logits, key, temperature, top_k, top_p), logits, out.cache,
                out.info.loops_run)

    def step(state, token, cache, key):
        return forward(state, token[:, None], cache, key)

    return Decoder(jax.jit(forward, donate_argnames=("cache",)),
                   jax.jit(step, donate_argnames=("cache",)))


def check_generation_args(cfg, prompt_len: int, max_new_tokens: int, temperature: float = 1.0,
                          top_k: int | None = None, top_p: float | None = None,
                          eos_id: int | None = None, max_len: int | None = None) -> int:
    """``ValueError`` naming the first bad argument of :func:`generate`; returns the cache
    length (default: prompt_len + max_new_tokens, at most ``cfg.max_seq_len``)."""
    check_sampling_args(temperature, top_k, top_p)
    if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
        raise ValueError(f"eos_id {eos_id} is outside the vocabulary [0, {cfg.vocab_size})")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
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


def generate(model, prompts, max_new_tokens: int, n_loops: int | None = None,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, seed: int = 0, max_len: int | None = None,
             on_token: Callable[[np.ndarray], None] | None = None, exit: str | None = None,
             exit_threshold: float = 1e-3, depth_slots: int | None = None) -> Generation:
    """Sample ``max_new_tokens`` per prompt (greedy at ``temperature=0``), stopping each
    sequence at ``eos_id``. ``max_len`` is the cache length (default: longest prompt +
    max_new_tokens). ``on_token`` receives each step's tokens (B,) (streaming).
    ``exit`` ("act" | "kl" | "delta", off by default): per-sequence early exit of the loop
    for every token (continuous depth-wise batching: a sequence that stopped is masked while
    the batch goes on); ``Generation.loops`` reports the loops run per token. It trades
    exactness against the full-depth model for fewer loops (see ``OpenMythos.__call__``).
    ``depth_slots`` (off by default): a recurrent cache of that many depth slots shared by
    all loops (slot t mod depth_slots; 1 = one slot per token, Huginn-style), trading cache
    memory for a change in the next-token distribution."""
    cfg = model.cfg
    n_loops = cfg.max_loop_iters if n_loops is None else n_loops
    longest = max(len(p) for p in prompts) if not hasattr(prompts, "shape") else prompts.shape[1]
    max_len = check_generation_args(cfg, longest, max_new_tokens, temperature, top_k, top_p,
                                    eos_id, max_len)
    # Prompts are padded to the whole prompt budget, so prefill compiles once per
    # (batch, max_len, max_new_tokens) whatever the prompt lengths.
    ids, start = left_pad(prompts, width=max_len - max_new_tokens)
    raise_if_out_of_vocab(ids.min(), ids.max(), cfg.vocab_size)
    batch = ids.shape[0]
    graphdef, state = nnx.split(model)
    if depth_slots is not None and not 1 <= depth_slots <= n_loops:
        raise ValueError(f"depth_slots must be in [1, n_loops={n_loops}], got {depth_slots}")
    decoder = compiled_decoder(graphdef, n_loops, float(temperature), top_k, top_p, exit,
                               float(exit_threshold))
    slots, shared = depth_slots or n_loops, depth_slots is not None
    check_fits("the KV cache", tree_bytes(jax.eval_shape(
        lambda: init_cache(cfg, batch, max_len, slots, start, shares_depths=shared))),
        f"lower n_loops={n_loops} (or set depth_slots), the batch {batch} or max_len={max_len}")
    keys = jax.random.split(jax.random.key(seed), max_new_tokens)
    cache = init_cache(cfg, batch, max_len, slots, start, shares_depths=shared)
    token, _, cache, loops_run = decoder.prefill(state, jnp.asarray(ids), cache, keys[0])

    fill = 0 if eos_id is None else eos_id
    tokens = np.full((batch, max_new_tokens), fill, np.int32)
    loops = np.zeros((batch, max_new_tokens), np.int32)
    finished = np.zeros((batch,), bool)
    lengths = np.zeros((batch,), np.int32)
    for step in range(max_new_tokens):
        next_token = np.where(finished, fill, np.asarray(token))
        tokens[:, step] = next_token
        loops[:, step] = np.where(finished, 0, np.asarray(loops_run))
        lengths += ~finished
        if on_token is not None:
            on_token(next_token)
        if eos_id is not None:
            finished |= next_token == eos_id
        if finished.all() or step == max_new_tokens - 1:
            break
        token, _, cache, loops_run = decoder.step(state, jnp.asarray(next_token), cache,
                                                  keys[step + 1])
    return Generation(tokens, lengths, loops)
