"""How routed (token, slot) rows reach their experts: x (N, D), expert_ids/weights (N, K) and
stacked SwiGLU kernels gate/up (E, D, F), down (E, F, D) -> combined output (N, D).

``dispatch(impl, ...)`` picks one strategy (``MythosConfig.moe_impl``); all are vectorised with
static shapes and no host sync, and agree up to float rounding when nothing is dropped:
  "dense"  every expert on every token, combined with one-hot weights: the reference.
  "grouped" (token, slot) rows sorted by expert into fixed-size blocks (one expert per
           block, each expert padded to a whole block) and run as one batched matmul: compute
           is bounded by N*K + E*(block-1) rows whatever the routing.
  "ragged" pairs sorted by expert and run as grouped matmuls (``lax.ragged_dot``); the form
           for GPU/TPU grouped-matmul kernels (XLA:CPU runs it about as slowly as "dense").
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def dispatch(impl: str, x, expert_ids, weights, gate, up, down) -> tuple[jax.Array, jax.Array]:
    """Run the routed experts with strategy ``impl``: x (N, D) -> (out (N, D), rows dropped
    (int32 scalar; 0 for the dropless strategies))."""
    return DISPATCHERS[impl](x, expert_ids, weights, gate, up, down), jnp.int32(0)


def _dense_dispatch(x, expert_ids, weights, gate, up, down):
    """Every expert on every token: x (N, D) -> (N, D). Reference; O(E) compute."""
    hidden = jax.nn.silu(jnp.einsum("nd,edf->enf", x, gate)) * jnp.einsum("nd,edf->enf", x, up)
    expert_out = jnp.einsum("enf,efd->end", hidden, down)                 # (E, N, D)
    combine = jnp.sum(jax.nn.one_hot(expert_ids, gate.shape[0], dtype=weights.dtype)
                      * weights[..., None], axis=1)                       # (N, E)
    return jnp.einsum("ne,end->nd", combine.astype(expert_out.dtype), expert_out)


def _grouped_dispatch(x, expert_ids, weights, gate, up, down):
    """Rows sorted by expert into fixed-size blocks, one expert per block: x (N, D) -> (N, D).

    Each expert's rows are padded up to a multiple of ``block``, so at most
    ``N*K + E*(block-1)`` rows are computed whatever the routing (balanced or all tokens on
    one expert); the static block count bounds that. Every block gathers its expert's
    kernels and the blocks run as one batched matmul.
    """
    n_tokens, k = expert_ids.shape
    n_experts, n_rows = gate.shape[0], expert_ids.size
    rows_per_expert = n_rows / (2 * n_experts)   # half the mean load: bounded padding
    block = 1 if rows_per_expert <= 1 else min(256, 8 * math.ceil(rows_per_expert / 8))
    n_blocks = math.ceil((n_rows + n_experts * (block - 1)) / block)

    flat_ids = expert_ids.reshape(-1)                                     # (N*K,)
    order = jnp.argsort(flat_ids, stable=True)                            # rows by expert
    sorted_ids = flat_ids[order]
    counts = jnp.bincount(flat_ids, length=n_experts)
    padded_counts = (counts + block - 1) // block * block
    padded_end = jnp.cumsum(padded_counts)
    rank_in_expert = jnp.arange(n_rows) - (jnp.cumsum(counts) - counts)[sorted_ids]
    dest = (padded_end - padded_counts)[sorted_ids] + rank_in_expert      # row -> buffer slot
    buffer = jnp.zeros((n_blocks * block, x.shape[1]), x.dtype)
    buffer = buffer.at[dest].set(x[order // k], unique_indices=True)
    block_expert = jnp.minimum(
        jnp.searchsorted(padded_end, jnp.arange(n_blocks) * block, side="right"), n_experts - 1)

    blocks = buffer.reshape(n_blocks, block, -1)
    hidden = (jax.nn.silu(jnp.einsum("nbd,ndf->nbf", blocks, gate[block_expert]))
              * jnp.einsum("nbd,ndf->nbf", blocks, up[block_expert]))
    block_out = jnp.einsum("nbf,nfd->nbd", hidden, down[block_expert])
    row_out = block_out.reshape(n_blocks * block, -1)[dest]
    row_out = row_out * weights.reshape(-1)[order][:, None].astype(row_out.dtype)
    return jnp.zeros((n_tokens, x.shape[1]), row_out.dtype).at[order // k].add(row_out)


def _ragged_dispatch(x, expert_ids, weights, gate, up, down):
    """(token, slot) pairs grouped by expert, grouped matmuls: x (N, D) -> (N, D). Dropless."""
    n_tokens, k = expert_ids.shape
    flat_ids = expert_ids.reshape(-1)                                     # (N*K,)
    order = jnp.argsort(flat_ids, stable=True)
    rows = x[order // k]                                                  # (N*K, D) sorted
    group_sizes = jnp.bincount(flat_ids, length=gate.shape[0]).astype(jnp.int32)
    hidden = (jax.nn.silu(jax.lax.ragged_dot(rows, gate, group_sizes))
              * jax.lax.ragged_dot(rows, up, group_sizes))
    sorted_out = jax.lax.ragged_dot(hidden, down, group_sizes)            # (N*K, D)
    slot_out = jnp.zeros_like(sorted_out).at[order].set(sorted_out).reshape(n_tokens, k, -1)
    return jnp.einsum("nkd,nk->nd", slot_out, weights.astype(slot_out.dtype))


DISPATCHERS = {"dense": _dense_dispatch, "grouped": _grouped_dispatch, "ragged": _ragged_dispatch}
