"""Log-likelihood of target tokens after their context, many windows per jitted forward.

    scorer = Scorer(model, LoopSpec(4), batch_size=8, max_length=256)
    scores = scorer([(context_ids, target_ids), ...])    # one Score per window

Each window is read as ``context + targets``: the model sees its last ``max_length + 1``
tokens but the final one, and the last ``len(targets)`` predictions are scored. Windows run
longest first, ``batch_size`` at a time (a short batch repeats its first row), LEFT-padded
(id 0) to a bucket length (powers of two from ``BUCKET_MIN``, capped at ``max_length``) with
each row's first real position as the forward's ``start``: positions start at 0 there,
padding is never attended and exit rules read real positions only, so a row scores as it
would alone. One program is compiled per (batch, bucket) for the scorer's LoopSpec.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mythos_jax.inference.generate import bucket_length
from mythos_jax.loops import LoopSpec

BUCKET_MIN = 16


class Score(NamedTuple):
    logprob: float    # sum of the targets' log-probabilities
    greedy: bool      # every target is the argmax of its prediction
    loops: int        # loops the forward ran for this window


class Scorer:
    """Scores windows with ``model`` run as ``loops`` (a static count, or one with an exit
    rule); ``max_length``: the longest input row (at most the model's ``max_seq_len``)."""

    def __init__(self, model, loops: LoopSpec, batch_size: int, max_length: int):
        graphdef, self.state = nnx.split(model)
        self.batch_size, self.max_length = batch_size, max_length

        def score(state, ids, start, labels, mask):
            out = nnx.merge(graphdef, state)(ids, loops, start=start, return_info=True)
            logprobs = jax.nn.log_softmax(out.logits, axis=-1)              # (B, T, V)
            picked = jnp.take_along_axis(logprobs, labels[..., None], axis=-1)[..., 0]
            hits = jnp.argmax(out.logits, axis=-1) == labels                # (B, T)
            return (jnp.sum(jnp.where(mask, picked, 0.0), axis=-1),
                    jnp.all(hits | ~mask, axis=-1), out.info.loops_run)

        self._score = jax.jit(score)

    def __call__(self, windows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[Score]:
        """One :class:`Score` per ``(context, targets)`` window, in order: a context of at
        least one token, at most ``max_length`` targets (none: 0.0, greedy)."""
        rows = [self._row(context, targets) for context, targets in windows]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        scores: list[Score | None] = [None] * len(rows)
        for first in range(0, len(order), self.batch_size):
            chunk = order[first:first + self.batch_size]
            for i, score in zip(chunk, self._batch([rows[i] for i in chunk])):
                scores[i] = score
        return scores

    def _row(self, context: Sequence[int], targets: Sequence[int]) -> tuple[list, list, int]:
        """(input ids, the next id at each input, how many of the last are scored)."""
        if not context:
            raise ValueError("a scored window needs at least one context token")
        if len(targets) > self.max_length:
            raise ValueError(f"a continuation of {len(targets)} tokens does not fit "
                             f"max_length={self.max_length}")
        tokens = [int(t) for t in (*context, *targets)]
        if not targets:                 # nothing to score (0.0, greedy): the context runs
            tokens = tokens[-self.max_length:]
            return tokens, tokens, 0
        tokens = tokens[-(self.max_length + 1):]
        return tokens[:-1], tokens[1:], len(targets)

    def _batch(self, rows: list[tuple[list, list, int]]) -> list[Score]:
        """Scores of up to ``batch_size`` rows in one forward (left-padded to a bucket)."""
        width = bucket_length(max(len(inputs) for inputs, _, _ in rows), self.max_length,
                              BUCKET_MIN)
        padded = rows + [rows[0]] * (self.batch_size - len(rows))
        ids = np.zeros((self.batch_size, width), np.int32)
        labels = np.zeros_like(ids)
        mask = np.zeros(ids.shape, bool)
        start = np.zeros((self.batch_size,), np.int32)
        for b, (inputs, next_ids, scored) in enumerate(padded):
            start[b] = width - len(inputs)
            ids[b, start[b]:] = inputs
            labels[b, start[b]:] = next_ids
            mask[b, width - scored:width] = True
        logprob, greedy, loops = jax.device_get(self._score(
            self.state, jnp.asarray(ids), jnp.asarray(start), jnp.asarray(labels),
            jnp.asarray(mask)))
        return [Score(float(logprob[b]), bool(greedy[b]), int(loops[b]))
                for b in range(len(rows))]
