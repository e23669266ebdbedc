"""Synthetic reasoning tasks in byte-level tokens, generated from (seed, split, example index).

Each generator returns ``(tokens, answer_start)``: ``tokens`` (L,) int32 is the whole example
ending with EOS (256), and the answer is ``tokens[answer_start:]`` (answer tokens + that EOS),
the only positions a model is scored on. Nothing is stored: an example is a pure function of
its random generator, which ``example_rng`` derives from (seed, split, index).

k-hop composition (``khop_example``): a random cyclic permutation over ``n_facts`` of the
``n_entities`` entities (entity i is token ``ENTITY_BASE + i``, so at most 128 entities). The
prompt lists its facts ``a b`` (b is a's successor) in random order, each followed by a space,
then the query ``? s`` followed by one ``>`` per hop and ``=``; the answer is the entity k
successors after s. The hop count is spelled as k repeated tokens so that a query with more
hops than training ever had is still made of known tokens (Kohli et al. write k relations).
With one cycle every entity appears once on each side, so no answer can be found without
following k links. Example (entities shown as letters, 4 facts, k = 2):
``AC BD CB DA ?A>>=B<EOS>``.

Addition (``addition_example``): ``a+b=`` then the digits of a + b, least significant first
when ``reverse`` (the order a causal model can produce with local carries), then EOS.
Operands have no leading zeros. Example (reverse): ``57+8=56<EOS>`` (57 + 8 = 65).
"""

from __future__ import annotations

import numpy as np

from mythos_jax.train.tokenizer import BYTE_EOS

ENTITY_BASE = 128
MAX_ENTITIES = 256 - ENTITY_BASE
TRAIN_STREAM = 0
EVAL_STREAM = 1


def example_rng(seed: int, stream: int, index: int, split_value: int = 0) -> np.random.Generator:
    """The generator of one example: train examples use (seed, TRAIN_STREAM, 0, index), those of
    eval split ``hops=k`` / ``digits=d`` use (seed, EVAL_STREAM, k or d, index)."""
    return np.random.default_rng((seed, stream, split_value, index))


def khop_example(rng: np.random.Generator, n_entities: int, n_facts: int,
                 hops: int) -> tuple[np.ndarray, int]:
    """One k-hop query over a random ``n_facts``-cycle; needs ``1 <= hops < n_facts``."""
    cycle = rng.choice(n_entities, size=n_facts, replace=False) + ENTITY_BASE
    order = rng.permutation(n_facts)
    facts = np.stack([cycle[order], cycle[(order + 1) % n_facts],
                      np.full(n_facts, ord(" "))], axis=1).ravel()
    start = int(rng.integers(n_facts))
    query = [ord("?"), cycle[start], *[ord(">")] * hops, ord("=")]
    tokens = np.concatenate([facts, query, [cycle[(start + hops) % n_facts], BYTE_EOS]])
    return tokens.astype(np.int32), len(tokens) - 2


def khop_length(n_facts: int, hops: int) -> int:
    """Tokens in a k-hop example (facts, query, answer, EOS)."""
    return 3 * n_facts + hops + 5


def addition_example(rng: np.random.Generator, digits_a: int, digits_b: int,
                     reverse: bool) -> tuple[np.ndarray, int]:
    """``a+b=`` and the answer, for random operands of exactly ``digits_a``/``digits_b``
    digits."""
    a, b = _random_number(rng, digits_a), _random_number(rng, digits_b)
    answer = str(int(a) + int(b))
    prompt = f"{a}+{b}=".encode()
    text = prompt + (answer[::-1] if reverse else answer).encode()
    tokens = np.append(np.frombuffer(text, np.uint8), BYTE_EOS).astype(np.int32)
    return tokens, len(prompt)


def addition_length(digits: int) -> int:
    """Longest example with both operands of ``digits`` digits (answer one digit longer)."""
    return 3 * digits + 4


def _random_number(rng: np.random.Generator, digits: int) -> str:
    leading = int(rng.integers(1 if digits > 1 else 0, 10))
    return str(leading) + "".join(map(str, rng.integers(0, 10, digits - 1)))
