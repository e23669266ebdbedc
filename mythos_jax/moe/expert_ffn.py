"""The routed SwiGLU experts over rows already placed by ``slots``: stacked kernels gate/up
(E, D, F), down (E, F, D); rows sorted by expert (blocks or grouped matmuls) or per-expert
buffers (E, C, D)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mythos_jax.kernels.dispatch import mesh_platform
from mythos_jax.modes import GroupedMatmul


def blocked_swiglu(rows, group_sizes, gate, up, down) -> jax.Array:
    """Rows sorted by expert (M, D) -> each row through its expert (M, D); rows past
    ``sum(group_sizes)`` give 0.

    Each expert's rows are padded up to a multiple of ``block``, so at most
    ``M + E*(block-1)`` rows are computed whatever the routing (balanced or all rows on one
    expert); the static block count bounds that. Every block gathers its expert's kernels and
    the blocks run as one batched matmul.
    """
    n_rows, n_experts = rows.shape[0], gate.shape[0]
    block = block_size(n_rows, n_experts)
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


def block_size(n_rows: int, n_experts: int) -> int:
    """Rows per block of :func:`blocked_swiglu`: half the mean load per expert (bounded
    padding), a multiple of 8 up to 256; 1 when there is at most two rows per expert."""
    rows_per_expert = n_rows / (2 * n_experts)
    return 1 if rows_per_expert <= 1 else min(256, 8 * math.ceil(rows_per_expert / 8))


def rowwise_swiglu(x, expert_ids, weights, gate, up, down) -> jax.Array:
    """x (N, D), expert_ids/weights (N, K) -> (N, D): every (token, choice) row gathers its
    expert's kernels, no sorting. The same work and kernel bytes as :func:`blocked_swiglu`
    with one-row blocks, in a handful of ops instead of a sort and scatter (decode sizes)."""
    n_tokens, top_k = expert_ids.shape
    chosen = expert_ids.reshape(-1)
    rows = jnp.repeat(x, top_k, axis=0)                                   # (N*K, D)
    hidden = (jax.nn.silu(jnp.einsum("md,mdf->mf", rows, gate[chosen]))
              * jnp.einsum("md,mdf->mf", rows, up[chosen]))
    out = jnp.einsum("mf,mfd->md", hidden, down[chosen]).reshape(n_tokens, top_k, -1)
    return jnp.einsum("nkd,nk->nd", out, weights.astype(out.dtype))


def ragged_swiglu(rows, group_sizes, gate, up, down,
                  grouped_matmul: str = GroupedMatmul.AUTO) -> jax.Array:
    """Rows sorted by expert (M, D) -> each row through its expert (M, D), as grouped matmuls;
    rows past ``sum(group_sizes)`` give 0."""
    matmul = _megablox_matmul if uses_megablox(grouped_matmul) else jax.lax.ragged_dot
    hidden = jax.nn.silu(matmul(rows, gate, group_sizes)) * matmul(rows, up, group_sizes)
    return matmul(hidden, down, group_sizes)


def uses_megablox(grouped_matmul: str) -> bool:
    """Whether ``grouped_matmul`` (a ``GroupedMatmul``) picks the Pallas kernel. "auto" does
    on TPU, except under a multi-device mesh outside ``shard_map``: GSPMD cannot partition a
    Pallas call (the expert-parallel path runs it per shard instead)."""
    if grouped_matmul != GroupedMatmul.AUTO:
        return grouped_matmul == GroupedMatmul.MEGABLOX
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
