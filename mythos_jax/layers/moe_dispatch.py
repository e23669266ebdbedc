"""How routed (token, choice) rows reach their experts: x (N, D), expert_ids/weights (N, K) and
stacked SwiGLU kernels gate/up (E, D, F), down (E, F, D) -> combined output (N, D).

``dispatch(impl, ...)`` picks one strategy (``MythosConfig.moe_impl``); all are vectorised with
static shapes and no host sync, and agree up to float rounding when nothing is dropped:
  "dense"    every expert on every token, combined with one-hot weights: the reference.
  "grouped"  rows sorted by expert into fixed-size blocks (one expert per block, each expert
             padded to a whole block) and run as one batched matmul: compute is bounded by
             N*K + E*(block-1) rows whatever the routing. Dropless; fastest on XLA:CPU.
  "dropless" rows sorted by expert and run as grouped matmuls: ``lax.ragged_dot`` or, on TPU,
             the Pallas megablox ``gmm`` kernel (``grouped_matmul``).
  "capacity" each expert takes at most C = ceil(capacity_factor * N*K / E) rows into an
             (E, C, D) buffer; the rest are dropped (contribute 0) and counted. First choices
             of all tokens take slots before second choices (GShard priority).
When the current mesh (``jax.sharding.get_abstract_mesh()``, set by ``jax.set_mesh``) has an
``expert`` axis of size > 1, every strategy but "dense" runs expert-parallel
(``mythos_jax.parallel.expert``); "dense" stays a GSPMD-partitioned einsum.

Rows whose expert id is ``E`` (one past the last) are padding: they sort last, fill no slot and
are neither computed nor counted as dropped.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mythos_jax.kernels.dispatch import mesh_platform

GROUPED_MATMULS = ("auto", "ragged_dot", "megablox")


def dispatch(impl: str, x, expert_ids, weights, gate, up, down, *,
             capacity_factor: float | None = None,
             grouped_matmul: str = "auto") -> tuple[jax.Array, jax.Array]:
    """Run the routed experts with strategy ``impl``: x (N, D) -> (out (N, D), rows dropped
    (int32 scalar; 0 unless ``impl == "capacity"``)).

    ``capacity_factor`` (capacity only): None sizes every buffer so that nothing is dropped.
    ``grouped_matmul`` (dropless only): "ragged_dot", "megablox" (interpreted off TPU) or
    "auto" (megablox on TPU, else ragged_dot).
    """
    if impl not in STRATEGIES:
        raise ValueError(f"moe_impl must be one of {tuple(STRATEGIES)}, got {impl!r}")
    if grouped_matmul not in GROUPED_MATMULS:
        raise ValueError(f"grouped_matmul must be one of {GROUPED_MATMULS}, got {grouped_matmul!r}")
    options = dict(capacity_factor=capacity_factor, grouped_matmul=grouped_matmul)
    mesh = jax.sharding.get_abstract_mesh()
    if impl != "dense" and not mesh.empty and mesh.shape.get("expert", 1) > 1:
        # imported here: mythos_jax.parallel imports the model, which imports this module
        from mythos_jax.parallel.expert import expert_parallel_dispatch
        return expert_parallel_dispatch(impl, mesh, x, expert_ids, weights, gate, up, down,
                                        **options)
    return STRATEGIES[impl](x, expert_ids, weights, gate, up, down, **options)


# ============================================================================ shared pieces
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


def blocked_swiglu(rows, group_sizes, gate, up, down) -> jax.Array:
    """Rows sorted by expert (M, D) -> each row through its expert (M, D); rows past
    ``sum(group_sizes)`` give 0.

    Each expert's rows are padded up to a multiple of ``block``, so at most
    ``M + E*(block-1)`` rows are computed whatever the routing (balanced or all rows on one
    expert); the static block count bounds that. Every block gathers its expert's kernels and
    the blocks run as one batched matmul.
    """
    n_rows, n_experts = rows.shape[0], gate.shape[0]
    rows_per_expert = n_rows / (2 * n_experts)   # half the mean load: bounded padding
    block = 1 if rows_per_expert <= 1 else min(256, 8 * math.ceil(rows_per_expert / 8))
    n_blocks = math.ceil((n_rows + n_experts * (block - 1)) / block)

    ends = jnp.cumsum(group_sizes)
    padded_counts = (group_sizes + block - 1) // block * block
    padded_end = jnp.cumsum(padded_counts)
    row_expert = jnp.searchsorted(ends, jnp.arange(n_rows), side="right")  # E for padding
    expert = jnp.minimum(row_expert, n_experts - 1)
    rank_in_expert = jnp.arange(n_rows) - (ends - group_sizes)[expert]
    dest = jnp.where(row_expert < n_experts,
                     (padded_end - padded_counts)[expert] + rank_in_expert, n_blocks * block)
    buffer = jnp.zeros((n_blocks * block, rows.shape[1]), rows.dtype)
    buffer = buffer.at[dest].set(rows, unique_indices=True, mode="drop")
    block_expert = jnp.minimum(
        jnp.searchsorted(padded_end, jnp.arange(n_blocks) * block, side="right"), n_experts - 1)

    blocks = buffer.reshape(n_blocks, block, -1)
    hidden = (jax.nn.silu(jnp.einsum("nbd,ndf->nbf", blocks, gate[block_expert]))
              * jnp.einsum("nbd,ndf->nbf", blocks, up[block_expert]))
    block_out = jnp.einsum("nbf,nfd->nbd", hidden, down[block_expert])
    return block_out.reshape(n_blocks * block, -1).at[dest].get(mode="fill", fill_value=0)


def ragged_swiglu(rows, group_sizes, gate, up, down, grouped_matmul: str = "auto") -> jax.Array:
    """Rows sorted by expert (M, D) -> each row through its expert (M, D), as grouped matmuls;
    rows past ``sum(group_sizes)`` give 0."""
    matmul = _megablox_matmul if uses_megablox(grouped_matmul) else jax.lax.ragged_dot
    hidden = jax.nn.silu(matmul(rows, gate, group_sizes)) * matmul(rows, up, group_sizes)
    return matmul(hidden, down, group_sizes)


def uses_megablox(grouped_matmul: str) -> bool:
    """Whether ``grouped_matmul`` ("auto", "ragged_dot", "megablox") picks the Pallas kernel.
    "auto" does on TPU, except under a multi-device mesh outside ``shard_map``: GSPMD cannot
    partition a Pallas call (the expert-parallel path runs it per shard instead)."""
    if grouped_matmul != "auto":
        return grouped_matmul == "megablox"
    mesh = jax.sharding.get_abstract_mesh()
    partitioned = not mesh.empty and not mesh.manual_axes and math.prod(mesh.axis_sizes) > 1
    return mesh_platform() == "tpu" and not partitioned


def _megablox_matmul(lhs, rhs, group_sizes) -> jax.Array:
    """``lax.ragged_dot`` via the Pallas megablox ``gmm`` (interpret mode off TPU): lhs (M, K),
    rhs (G, K, N) -> (M, N). Rows are padded to a whole row tile; rows past the groups give 0."""
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    n_rows = lhs.shape[0]
    tile_rows = min(128, 8 * math.ceil(n_rows / 8))
    padded_rows = tile_rows * math.ceil(n_rows / tile_rows)
    tiling = (tile_rows, min(128, rhs.shape[1]), min(128, rhs.shape[2]))
    out = gmm(jnp.pad(lhs, ((0, padded_rows - n_rows), (0, 0))), rhs, group_sizes, jnp.float32,
              tiling, None, None, False, mesh_platform() != "tpu")[:n_rows]
    in_groups = jnp.arange(n_rows) < jnp.sum(group_sizes)
    return jnp.where(in_groups[:, None], out, 0).astype(lhs.dtype)


def batched_swiglu(buffer, gate, up, down) -> jax.Array:
    """Per-expert row buffers (E, C, D) -> each expert on its own rows (E, C, D)."""
    hidden = (jax.nn.silu(jnp.einsum("ecd,edf->ecf", buffer, gate))
              * jnp.einsum("ecd,edf->ecf", buffer, up))
    return jnp.einsum("ecf,efd->ecd", hidden, down)


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


# ============================================================================ local strategies
def _dense_dispatch(x, expert_ids, weights, gate, up, down, **_):
    """Every expert on every token: x (N, D) -> (N, D). Reference; O(E) compute."""
    hidden = jax.nn.silu(jnp.einsum("nd,edf->enf", x, gate)) * jnp.einsum("nd,edf->enf", x, up)
    expert_out = jnp.einsum("enf,efd->end", hidden, down)                 # (E, N, D)
    combine = jnp.sum(jax.nn.one_hot(expert_ids, gate.shape[0], dtype=weights.dtype)
                      * weights[..., None], axis=1)                       # (N, E)
    return jnp.einsum("ne,end->nd", combine.astype(expert_out.dtype), expert_out), jnp.int32(0)


def _sorted_dispatch(expert_ffn, x, expert_ids, weights, gate, up, down):
    """Rows sorted by expert, ``expert_ffn(rows, group_sizes, gate, up, down)``, combined."""
    sort = sort_by_expert(expert_ids.reshape(-1), gate.shape[0])
    rows = x[sort.order // expert_ids.shape[1]]                           # (N*K, D) sorted
    return combine_sorted(expert_ffn(rows, sort.group_sizes, gate, up, down), sort, weights)


def _grouped_dispatch(x, expert_ids, weights, gate, up, down, **_):
    return _sorted_dispatch(blocked_swiglu, x, expert_ids, weights, gate, up, down), jnp.int32(0)


def _dropless_dispatch(x, expert_ids, weights, gate, up, down, *, grouped_matmul, **_):
    def expert_ffn(*args):
        return ragged_swiglu(*args, grouped_matmul=grouped_matmul)
    return _sorted_dispatch(expert_ffn, x, expert_ids, weights, gate, up, down), jnp.int32(0)


def _capacity_dispatch(x, expert_ids, weights, gate, up, down, *, capacity_factor, **_):
    n_experts = gate.shape[0]
    capacity = expert_capacity(*expert_ids.shape, n_experts, capacity_factor)
    slots = capacity_slots(expert_ids, n_experts, capacity)
    expert_out = batched_swiglu(fill_buffers(x, slots, n_experts, capacity), gate, up, down)
    return combine_buffers(expert_out, slots, weights), slots.dropped


STRATEGIES = {"dense": _dense_dispatch, "grouped": _grouped_dispatch,
              "dropless": _dropless_dispatch, "capacity": _capacity_dispatch}
