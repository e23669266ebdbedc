"""Where routed rows go: sorted by expert, or into per-expert capacity buffers, and back.

Rows are (token, choice) pairs of expert_ids (N, K). A row whose expert id is ``E`` (one past
the last) is padding: it sorts last, fills no slot and is neither computed nor dropped.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class ExpertSort(NamedTuple):
    """Rows ordered by expert: ``order`` (M,) sorted position -> row; ``group_sizes`` (E,)
    int32 rows per expert; padding rows (id E) come after all ``sum(group_sizes)`` real ones."""
    order: jax.Array
    group_sizes: jax.Array


def sort_by_expert(row_expert: jax.Array, n_experts: int) -> ExpertSort:
    """row_expert (M,) int in [0, E] -> the stable order that groups rows by expert."""
    return ExpertSort(jnp.argsort(row_expert, stable=True),
                      jnp.bincount(row_expert, length=n_experts).astype(jnp.int32))


def combine_sorted(sorted_out: jax.Array, sort: ExpertSort, weights: jax.Array) -> jax.Array:
    """Expert outputs of the sorted rows (N*K, D) -> weighted sum per token (N, D); padding
    rows are skipped."""
    n_tokens, k = weights.shape
    n_rows = sorted_out.shape[0]
    token = jnp.where(jnp.arange(n_rows) < jnp.sum(sort.group_sizes), sort.order // k, n_tokens)
    weighted = sorted_out * weights.reshape(-1)[sort.order][:, None].astype(sorted_out.dtype)
    return (jnp.zeros((n_tokens, sorted_out.shape[1]), sorted_out.dtype)
            .at[token].add(weighted, mode="drop"))


class CapacitySlots(NamedTuple):
    """Where each (token, choice) sits in its expert's buffer: ``expert`` (N, K) its expert,
    or E when it was dropped or is padding; ``slot`` (N, K) its row in that buffer;
    ``dropped`` int32 count of real rows that found no slot."""
    expert: jax.Array
    slot: jax.Array
    dropped: jax.Array


def expert_capacity(n_tokens: int, k: int, n_experts: int, capacity_factor: float | None) -> int:
    """Rows per expert buffer: ceil(capacity_factor * N*K / E), at least 1; None: N (every row
    fits, since a token's K experts are distinct)."""
    if capacity_factor is None:
        return n_tokens
    return max(1, math.ceil(capacity_factor * n_tokens * k / n_experts))


def capacity_slots(expert_ids: jax.Array, n_experts: int, capacity: int) -> CapacitySlots:
    """expert_ids (N, K) -> each row's slot in an (E, capacity) buffer. Slots are taken in
    priority order: all first choices (tokens in order), then all second choices, ..."""
    n_tokens, k = expert_ids.shape
    by_priority = expert_ids.T.reshape(-1)                                # (K*N,) choice-major
    sort = sort_by_expert(by_priority, n_experts)
    starts = jnp.cumsum(sort.group_sizes) - sort.group_sizes
    rank_sorted = jnp.arange(by_priority.size) - starts[jnp.minimum(by_priority[sort.order],
                                                                    n_experts - 1)]
    slot = jnp.zeros_like(by_priority).at[sort.order].set(rank_sorted).reshape(k, n_tokens).T
    real = expert_ids < n_experts
    kept = real & (slot < capacity)
    return CapacitySlots(jnp.where(kept, expert_ids, n_experts), slot,
                         jnp.sum(real & ~kept).astype(jnp.int32))


def fill_buffers(x, slots: CapacitySlots, n_experts: int, capacity: int) -> jax.Array:
    """Tokens (N, D) -> per-expert buffers (E, capacity, D); empty slots are 0."""
    rows = jnp.broadcast_to(x[:, None, :], (*slots.expert.shape, x.shape[1]))
    return (jnp.zeros((n_experts, capacity, x.shape[1]), x.dtype)
            .at[slots.expert, slots.slot].set(rows, mode="drop"))


def combine_buffers(expert_out, slots: CapacitySlots, weights) -> jax.Array:
    """Expert outputs (E, C, D) -> weighted sum per token (N, D); dropped rows give 0."""
    per_choice = expert_out.at[slots.expert, slots.slot].get(mode="fill", fill_value=0)
    return jnp.einsum("nkd,nk->nd", per_choice, weights.astype(per_choice.dtype))
