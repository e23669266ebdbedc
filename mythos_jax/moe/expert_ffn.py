"""The routed SwiGLU experts over rows already placed by ``slots``: stacked kernels gate/up
(E, D, F), down (E, F, D); rows sorted by expert (blocks or grouped matmuls), per-expert
buffers (E, C, D), or, at decode sizes, per-row kernels or every expert on every token."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mythos_jax.modes import GroupedMatmul
from mythos_jax.moe.grouped_matmul import grouped_matmul as choose_grouped_matmul


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


def every_expert_swiglu(x, expert_ids, weights, gate, up, down) -> jax.Array:
    """x (N, D), expert_ids/weights (N, K) -> (N, D): every expert on every token, as E
    batched matmuls over the same N rows (the kernels in their stored layout, no transpose),
    combined with the routing weights (0 for the experts a token did not choose). O(E)
    compute; each kernel read once."""
    n_experts = gate.shape[0]
    rows = jnp.broadcast_to(x, (n_experts, *x.shape))                     # (E, N, D)
    hidden = (jax.nn.silu(jnp.einsum("end,edf->enf", rows, gate))
              * jnp.einsum("end,edf->enf", rows, up))
    expert_out = jnp.einsum("enf,efd->end", hidden, down)                 # (E, N, D)
    combine = jnp.sum(jax.nn.one_hot(expert_ids, n_experts, dtype=weights.dtype)
                      * weights[..., None], axis=1)                       # (N, E)
    return jnp.einsum("ne,end->nd", combine.astype(expert_out.dtype), expert_out)


# Up to this many tokens :func:`every_expert_swiglu` reads the kernels faster than per-row
# gathers (XLA:CPU, 16 experts of 128 x 64: 194 vs 250 us at 8 tokens, 224 vs 406 us at 16).
EVERY_EXPERT_MAX_TOKENS = 16


def reads_every_expert(n_tokens: int, top_k: int, n_experts: int) -> bool:
    """Whether :func:`every_expert_swiglu` beats :func:`rowwise_swiglu` at these decode sizes:
    at least E (token, choice) rows, so per-row kernel gathers would read more than all E
    kernels, and few enough tokens (<= ``EVERY_EXPERT_MAX_TOKENS``) that reading the kernels,
    not the E/K-fold compute, sets the time."""
    return n_tokens * top_k >= n_experts and n_tokens <= EVERY_EXPERT_MAX_TOKENS


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
    """Rows sorted by expert (M, D) -> each row through its expert (M, D), as grouped matmuls
    (``moe.grouped_matmul``); rows past ``sum(group_sizes)`` give 0."""
    matmul = choose_grouped_matmul(grouped_matmul, rows.dtype)
    hidden = jax.nn.silu(matmul(rows, gate, group_sizes)) * matmul(rows, up, group_sizes)
    return matmul(hidden, down, group_sizes)


def batched_swiglu(buffer, gate, up, down) -> jax.Array:
    """Per-expert row buffers (E, C, D) -> each expert on its own rows (E, C, D)."""
    hidden = (jax.nn.silu(jnp.einsum("ecd,edf->ecf", buffer, gate))
              * jnp.einsum("ecd,edf->ecf", buffer, up))
    return jnp.einsum("ecf,efd->ecd", hidden, down)
