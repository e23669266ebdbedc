"""Expert parallelism: routed experts sharded over the mesh's ``expert`` axis, tokens sent to
the devices that hold their experts and back, inside ``jax.shard_map``.

Inside the shard_map every device holds ``n / S`` tokens (the token axis is split over every
mesh axis of size > 1; padded to a multiple of the device count) and ``E / S`` experts (S =
expert-axis size; kernels are gathered over their other mesh axes, e.g. FSDP, on entry):

  "capacity"  each device fills (E, C, D) buffers, C = ceil(capacity_factor * n_local*K / E)
              (drops are per source device), and one tiled ``lax.all_to_all`` sends expert
              e's buffer to the device of e; a second brings the outputs back. Runs anywhere.
  "dropless"  rows sorted by expert; per-device send sizes come from an ``all_gather`` of the
  "grouped"   expert counts; ``lax.ragged_all_to_all`` sends each device exactly its rows into
              a worst-case receive buffer (S * n_local*K rows), where they are re-sorted by
              local expert and run as grouped matmuls ("dropless") or blocks ("grouped").
              XLA:CPU does not implement ragged-all-to-all: there an all_gather-based
              emulation with the same semantics runs instead (logged once).
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from mythos_jax.kernels.dispatch import mesh_platform
from mythos_jax.modes import GroupedMatmul, MoEImpl
from mythos_jax.moe.expert_ffn import batched_swiglu, blocked_swiglu, ragged_swiglu
from mythos_jax.moe.grouped_matmul import is_pallas
from mythos_jax.moe.slots import (capacity_slots, combine_buffers, combine_sorted,
                                  expert_capacity, fill_buffers, sort_by_expert)

EXPERT_AXIS = "expert"

logger = logging.getLogger(__name__)


def expert_parallel_dispatch(impl: str, mesh, x, expert_ids, weights, gate, up, down, *,
                             capacity_factor: float | None = None,
                             grouped_matmul: str = GroupedMatmul.AUTO,
                             emulate_ragged: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """``moe.dispatch.dispatch`` with experts sharded over ``mesh``'s expert axis: x (N, D),
    expert_ids/weights (N, K), kernels (E, ...) -> (out (N, D), rows dropped (int32)).

    ``emulate_ragged``: use the all_gather emulation of ``ragged_all_to_all`` (None: on CPU).
    """
    if impl not in (MoEImpl.CAPACITY, MoEImpl.DROPLESS, MoEImpl.GROUPED):
        raise ValueError(f"expert-parallel moe_impl must be capacity, dropless or grouped, "
                         f"got {impl!r}")
    n_shards, n_experts = mesh.shape[EXPERT_AXIS], gate.shape[0]
    if n_experts % n_shards:
        raise ValueError(f"n_experts={n_experts} is not divisible by the size {n_shards} of "
                         f"the mesh axis {EXPERT_AXIS!r}: every device must hold as many experts")
    token_axes = tuple(axis for axis in mesh.axis_names if mesh.shape[axis] > 1)
    n_tokens = x.shape[0]
    pad = -n_tokens % math.prod(mesh.shape[axis] for axis in token_axes)
    x = jnp.pad(x, ((0, pad), (0, 0)))
    expert_ids = jnp.pad(expert_ids, ((0, pad), (0, 0)), constant_values=n_experts)
    weights = jnp.pad(weights, ((0, pad), (0, 0)))

    if impl == MoEImpl.CAPACITY:
        body = functools.partial(_capacity_exchange, capacity_factor=capacity_factor)
    else:
        if emulate_ragged is None:
            emulate_ragged = mesh_platform(mesh) == "cpu"
        if emulate_ragged:
            _log_emulation_once()
        expert_ffn = (blocked_swiglu if impl == MoEImpl.GROUPED else
                      functools.partial(ragged_swiglu, grouped_matmul=grouped_matmul))
        body = functools.partial(
            _dropless_exchange, expert_ffn=expert_ffn,
            ragged_all_to_all=ragged_all_to_all_emulated if emulate_ragged
            else lax.ragged_all_to_all)

    def counted(*args):
        out, dropped = body(*args)
        return out, lax.psum(dropped, token_axes)

    tokens, experts = P(token_axes), P(EXPERT_AXIS)
    # no check_vma around a Pallas call
    pallas_inside = impl == MoEImpl.DROPLESS and is_pallas(grouped_matmul, x.dtype)
    out, dropped = jax.shard_map(
        counted, mesh=mesh, in_specs=(tokens, tokens, tokens, experts, experts, experts),
        out_specs=(tokens, P()), check_vma=not pallas_inside)(x, expert_ids, weights, gate,
                                                              up, down)
    return out[:n_tokens], dropped


# ============================================================================ per-device bodies
def _capacity_exchange(x, expert_ids, weights, gate, up, down, *, capacity_factor):
    """One device: tokens (n, D), local kernels (E/S, ...) -> (out (n, D), local drops)."""
    n_experts = gate.shape[0] * lax.axis_size(EXPERT_AXIS)
    capacity = expert_capacity(*expert_ids.shape, n_experts, capacity_factor)
    slots = capacity_slots(expert_ids, n_experts, capacity)
    buffers = fill_buffers(x, slots, n_experts, capacity)                 # (E, C, D)
    received = lax.all_to_all(buffers, EXPERT_AXIS, 0, 1, tiled=True)     # (E/S, S*C, D)
    expert_out = batched_swiglu(received, gate, up, down)
    returned = lax.all_to_all(expert_out, EXPERT_AXIS, 1, 0, tiled=True)  # (E, C, D)
    return combine_buffers(returned, slots, weights), slots.dropped


def _dropless_exchange(x, expert_ids, weights, gate, up, down, *, expert_ffn, ragged_all_to_all):
    """One device: tokens (n, D), local kernels (E/S, ...) -> (out (n, D), 0)."""
    n_shards, me = lax.axis_size(EXPERT_AXIS), lax.axis_index(EXPERT_AXIS)
    local_experts = gate.shape[0]
    n_tokens, k = expert_ids.shape
    sort = sort_by_expert(expert_ids.reshape(-1), n_shards * local_experts)
    rows = x[sort.order // k]                                             # (n*K, D) by expert

    # sent[i, j, e]: rows device i sends to local expert e of device j
    sent = lax.all_gather(sort.group_sizes, EXPERT_AXIS).reshape(n_shards, n_shards,
                                                                 local_experts)
    counts = jnp.sum(sent, axis=-1)                                       # (S src, S dst)
    before_in_sender = jnp.cumsum(counts, axis=1) - counts    # offset of (i -> j) in i's rows
    before_in_receiver = jnp.cumsum(counts, axis=0) - counts  # offset of (i -> j) in j's buffer
    received = ragged_all_to_all(
        rows, jnp.zeros((n_shards * rows.shape[0], rows.shape[1]), rows.dtype),
        before_in_sender[me], counts[me], before_in_receiver[me], counts[:, me],
        axis_name=EXPERT_AXIS)                                # by source device, then expert

    segment_ends = jnp.cumsum(sent[:, me, :].reshape(-1))     # (S * E/S,) source-major
    segment = jnp.searchsorted(segment_ends, jnp.arange(received.shape[0]), side="right")
    local_expert = jnp.where(segment < segment_ends.size, segment % local_experts, local_experts)
    local = sort_by_expert(local_expert, local_experts)
    local_out = expert_ffn(received[local.order], local.group_sizes, gate, up, down)
    expert_out = jnp.zeros_like(received).at[local.order].set(local_out)

    returned = ragged_all_to_all(
        expert_out, jnp.zeros_like(rows), before_in_receiver[:, me], counts[:, me],
        before_in_sender[:, me], counts[me], axis_name=EXPERT_AXIS)
    return combine_sorted(returned, sort, weights), jnp.int32(0)


def ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
    """``lax.ragged_all_to_all`` from ``all_gather`` and a scatter, for XLA:CPU.

    Device i sends ``operand[input_offsets[j] : + send_sizes[j]]`` to device j, which writes it
    at ``output[output_offsets[j] : + send_sizes[j]]`` (offsets in the receiver's buffer, as
    given by the sender); ``recv_sizes`` is implied and unused. Every device gathers all
    operands (S times the traffic of the real op).
    """
    del recv_sizes
    me = lax.axis_index(axis_name)
    senders = [lax.all_gather(a, axis_name) for a in (operand, input_offsets, send_sizes,
                                                      output_offsets)]
    all_operands, from_offsets, sizes, to_offsets = senders   # (S, M, D), (S, S) x 3
    row = jnp.arange(operand.shape[0])
    source_rows = jnp.minimum(from_offsets[:, me, None] + row, operand.shape[0] - 1)  # (S, M)
    dest_rows = jnp.where(row < sizes[:, me, None], to_offsets[:, me, None] + row,
                          output.shape[0])
    rows = jnp.take_along_axis(all_operands, source_rows[..., None], axis=1)
    return output.at[dest_rows.reshape(-1)].set(rows.reshape(-1, operand.shape[1]),
                                                mode="drop")


@functools.cache
def _log_emulation_once() -> None:
    logger.warning("XLA:CPU does not implement ragged-all-to-all: the dropless expert-parallel "
                   "exchange uses an all_gather-based emulation (same values, S x the traffic)")
