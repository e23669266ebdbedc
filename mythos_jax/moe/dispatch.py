"""How routed (token, choice) rows reach their experts: x (N, D), expert_ids/weights (N, K) and
stacked SwiGLU kernels gate/up (E, D, F), down (E, F, D) -> combined output (N, D).

``dispatch(impl, ...)`` picks one strategy (a ``MoEImpl``, ``MythosConfig.moe_impl``); all
are vectorised with static shapes and no host sync, and agree up to float rounding when
nothing is dropped:
  "dense"    every expert on every token, combined with one-hot weights: the reference.
  "grouped"  rows sorted by expert into fixed-size blocks (one expert per block, each expert
             padded to a whole block) and run as one batched matmul: compute is bounded by
             N*K + E*(block-1) rows whatever the routing. Dropless; fastest on XLA:CPU.
             With at most two rows per expert (decode) each row gathers its expert's kernels
             instead (the same work without the sort), or, with at least E rows from at most
             16 tokens, every expert runs on every token (each kernel read once).
  "dropless" rows sorted by expert and run as grouped matmuls (a ``GroupedMatmul``; which
             runs where: the table of ``moe.grouped_matmul``).
  "capacity" each expert takes at most C = ceil(capacity_factor * N*K / E) rows into an
             (E, C, D) buffer; the rest are dropped (contribute 0) and counted. First choices
             of all tokens take slots before second choices (GShard priority).
When the current mesh (``jax.sharding.get_abstract_mesh()``, set by ``jax.set_mesh``) has an
``expert`` axis of size > 1, every strategy but "dense" runs expert-parallel
(``moe.expert_parallel``); "dense" stays a GSPMD-partitioned einsum. Rows whose expert id is
``E`` are padding (``moe.slots``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mythos_jax.modes import GroupedMatmul, MoEImpl
from mythos_jax.moe.expert_ffn import (batched_swiglu, block_size, blocked_swiglu,
                                       every_expert_swiglu, ragged_swiglu, reads_every_expert,
                                       rowwise_swiglu)
from mythos_jax.moe.expert_parallel import EXPERT_AXIS, expert_parallel_dispatch
from mythos_jax.moe.slots import (capacity_slots, combine_buffers, combine_sorted,
                                  expert_capacity, fill_buffers, sort_by_expert)


def dispatch(impl: str, x, expert_ids, weights, gate, up, down, *,
             capacity_factor: float | None = None,
             grouped_matmul: str = GroupedMatmul.AUTO) -> tuple[jax.Array, jax.Array]:
    """Run the routed experts with strategy ``impl``: x (N, D) -> (out (N, D), rows dropped
    (int32 scalar; 0 unless ``impl == "capacity"``)).

    ``capacity_factor`` (capacity only): None sizes every buffer so that nothing is dropped.
    ``grouped_matmul`` (dropless only): "ragged_dot", "megablox" (interpreted off TPU),
    "tokamax" or "auto" (by platform: ``moe.grouped_matmul.TABLE``).
    """
    impl = MoEImpl.parse(impl, "moe_impl")
    options = dict(capacity_factor=capacity_factor,
                   grouped_matmul=GroupedMatmul.parse(grouped_matmul, "grouped_matmul"))
    mesh = jax.sharding.get_abstract_mesh()
    if impl != MoEImpl.DENSE and not mesh.empty and mesh.shape.get(EXPERT_AXIS, 1) > 1:
        return expert_parallel_dispatch(impl, mesh, x, expert_ids, weights, gate, up, down,
                                        **options)
    return STRATEGIES[impl](x, expert_ids, weights, gate, up, down, **options)


def _dense_dispatch(x, expert_ids, weights, gate, up, down, **_):
    """Every expert on every token: x (N, D) -> (N, D). Reference; O(E) compute."""
    return every_expert_swiglu(x, expert_ids, weights, gate, up, down), jnp.int32(0)


def _sorted_dispatch(expert_ffn, x, expert_ids, weights, gate, up, down):
    """Rows sorted by expert, ``expert_ffn(rows, group_sizes, gate, up, down)``, combined."""
    sort = sort_by_expert(expert_ids.reshape(-1), gate.shape[0])
    rows = x[sort.order // expert_ids.shape[1]]                           # (N*K, D) sorted
    return combine_sorted(expert_ffn(rows, sort.group_sizes, gate, up, down), sort, weights)


def _grouped_dispatch(x, expert_ids, weights, gate, up, down, **_):
    if block_size(expert_ids.size, gate.shape[0]) == 1:
        decode_ffn = (every_expert_swiglu if reads_every_expert(*expert_ids.shape, gate.shape[0])
                      else rowwise_swiglu)
        return decode_ffn(x, expert_ids, weights, gate, up, down), jnp.int32(0)
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


STRATEGIES = {MoEImpl.DENSE: _dense_dispatch, MoEImpl.GROUPED: _grouped_dispatch,
              MoEImpl.DROPLESS: _dropless_dispatch, MoEImpl.CAPACITY: _capacity_dispatch}
