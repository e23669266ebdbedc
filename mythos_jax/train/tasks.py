"""Synthetic reasoning tasks in byte-level tokens, generated from (seed, split, example index).

Each generator returns ``(tokens, answer_start)``: ``tokens`` (L,) int32 is the whole example
and the answer is ``tokens[answer_start:]`` (answer tokens, and an EOS (256) for k-hop in
context and addition), the only positions a model is scored on. Nothing is stored: an example is
a pure function of its random generator, which ``example_rng`` derives from (seed, split,
index).

k-hop composition (``khop_example``): a random cyclic permutation over ``n_facts`` of the
``n_entities`` entities (entity i is token ``ENTITY_BASE + i``, so at most 128 entities). The
prompt lists its facts ``a b`` (b is a's successor) in random order, each followed by a space,
then the query ``? s`` followed by one ``>`` per hop and ``=``; the answer is the entity k
successors after s. The hop count is spelled as k repeated tokens so that a query with more hops
than training ever had is still made of known tokens (Kohli et al. write k relations). With one
cycle every entity appears once on each side, so no answer can be found without following k
links. Example (entities shown as letters, 4 facts, k = 2): ``AC BD CB DA ?A>>=B<EOS>``.

k-hop over a fixed knowledge graph (``graph_example``, Kohli et al.'s parametric facts): the
graph is ``n_relations`` random permutations of the entities, fixed by the data seed
(``knowledge_graph``), so its facts must be learned into the weights, not read from the prompt.
A query is the entity and one relation token per hop (relation r is token ``RELATION_BASE +
r``); the answer, predicted at the last relation, is the entity reached by applying the
relations left to right. Example (k = 3): ``A b a d F`` for F = d(a(b(A))). Two choices made
these queries learnable in minutes (``experiments/README.md``): no ``=`` marks the end (the
answer position would have to gather the last relation and the entity so far before its lookup),
and no EOS follows the answer (scoring an EOS after the answer kept the small looped models at
the entity marginal: they learned the EOS and stalled). Multi-hop tuples (k >= 2) are split
between training and evaluation by a hash of the tuple (``is_heldout``); training draws only
tuples none of whose prefixes is held out (``has_heldout_prefix``), so an in-distribution eval
query is a composition the model never saw, not even as the prefix of a longer training query;
one-hop queries are the atomic facts, all trained. With ``slots`` the relations are spread over
a fixed number of relation slots padded with an identity relation ``_`` (``A _ b _ a d F``): the
offset between the start entity and the answer no longer tells the hop count, which separates
depth from position. With ``shift`` the relations stay together but start after 0..shift
identity relations (``A _ _ b a d F``): training puts relations at positions past its hop counts
while the relations to compose are as many and as close as without it.

Addition (``addition_example``): ``a+b=`` then the digits of a + b, least significant first when
``reverse`` (the order a causal model can produce with local carries), then EOS. Operands have
no leading zeros. Example (reverse): ``57+8=56<EOS>`` (57 + 8 = 65).
"""

from __future__ import annotations

import hashlib

import numpy as np

from mythos_jax.train.tokenizer import BYTE_EOS

ENTITY_BASE = 128
RELATION_BASE = ord("a")
MAX_RELATIONS = 26
IDENTITY_RELATION = ord("_")      # a relation slot that keeps the entity (``graph_example``)
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


def knowledge_graph(seed: int, n_entities: int, n_relations: int) -> np.ndarray:
    """(n_relations, n_entities) int table: ``graph[r, e]`` is r applied to entity e (each
    relation a permutation), a pure function of (seed, sizes)."""
    rng = np.random.default_rng((seed, 0x6EA9, n_entities, n_relations))
    return np.stack([rng.permutation(n_entities) for _ in range(n_relations)])


def is_heldout(start: int, relations: np.ndarray, fraction: float) -> bool:
    """Whether the multi-hop query (start, relations) belongs to the held-out set: a stable hash
    of the tuple, so the split is the same on every process, run and seed."""
    if len(relations) < 2 or fraction <= 0:
        return False
    key = np.asarray([start, *relations], np.int64).tobytes()
    value = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return value / 2.0**64 < fraction


def has_heldout_prefix(start: int, relations: np.ndarray, fraction: float) -> bool:
    """Whether (start, relations[:j]) is held out for some j in 2..len(relations): such a query
    is never trained on, since training scores every prefix (``khop_supervision=every_hop``)
    and, answer-only, still has to compute the held-out composition on its way."""
    return any(is_heldout(start, relations[:j], fraction) for j in range(2, len(relations) + 1))


def graph_example(rng: np.random.Generator, graph: np.ndarray, hops: int, heldout: bool | None,
                  fraction: float, slots: int = 0,
                  shift: int = 0) -> tuple[np.ndarray, int, np.ndarray]:
    """One ``hops``-hop query over ``graph``: (tokens, answer_start, the entity token reached
    after each relation slot (max(hops, slots) + the shift drawn,)). ``heldout``: True draws only held-out tuples,
    False only tuples none of whose prefixes is held out (``has_heldout_prefix``), None any
    (hop counts no training example has). ``slots`` > 0 spreads the ``hops`` relations over
    that many slots in random order-preserving positions, the others holding the identity
    relation (``IDENTITY_RELATION``): every query is then equally long whatever its hops.
    ``shift`` > 0 puts 0..shift identity relations (uniform) before the first relation; the
    query drawn is the same as without it."""
    n_relations, n_entities = graph.shape
    while True:
        start = int(rng.integers(n_entities))
        relations = rng.integers(n_relations, size=hops)
        if (heldout is None or (is_heldout(start, relations, fraction) if heldout
                                else not has_heldout_prefix(start, relations, fraction))):
            break
    tokens = RELATION_BASE + relations
    if slots:
        placed = np.sort(rng.choice(slots, size=hops, replace=False))
        tokens = np.full(slots, IDENTITY_RELATION)
        tokens[placed] = RELATION_BASE + relations
    if shift:
        lead = int(rng.integers(shift + 1))
        tokens = np.concatenate([np.full(lead, IDENTITY_RELATION), tokens])
    reached, entity = [], start
    for token in tokens:
        if token != IDENTITY_RELATION:
            entity = int(graph[token - RELATION_BASE, entity])
        reached.append(ENTITY_BASE + entity)
    tokens = [ENTITY_BASE + start, *tokens, reached[-1]]
    return np.asarray(tokens, np.int32), len(tokens) - 1, np.asarray(reached, np.int32)


def graph_length(hops: int) -> int:
    """Tokens in a knowledge-graph query (entity, relations, answer)."""
    return hops + 2


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
