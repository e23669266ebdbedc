"""Latent MLA decode: one new query per head attends over the compressed cache.

    out = mla_decode_attention(q_latent, q_rope, c_kv, k_rope, kv_start, kv_end, scale=scale)

q_latent (B, H, kv_lora) is q_nope with k_up folded in (absorbed), q_rope (B, H, rope),
c_kv (B, S, kv_lora) the cached latent (keys and values at once), k_rope (B, S, rope) the ONE
shared rotated key per slot, valid slots [kv_start, kv_end) (B,) (a left-padded cache: slots
before the start and after the current index are invalid) -> (B, H, kv_lora) latent output
in c_kv's dtype; the caller applies v_up. Same numerics as ``MLAttention``'s decode branch:
scores ``(q . k) * scale`` and softmax in fp32. A sequence with no valid slot gives 0.

Flash-decoding: the slots are cut into ``num_splits`` ranges attended in parallel (partial
output and log-sum-exp each), then combined here. Backends: ``mla_decode_gpu`` (Triton),
``mla_decode_tpu`` (Mosaic); shapes a backend cannot tile fall back to XLA, logged once.
Under a mesh (``jax.set_mesh``) the kernel runs per shard as ``spec`` says: the
PartitionSpec of the (B, H) dimensions, computed by the caller from its sharding rules
(``sharding.per_shard``; None: whole arrays); the splits are planned for the local shard.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mythos_jax.kernels import mla_decode_gpu, mla_decode_tpu
from mythos_jax.kernels.tiles import check_block_sizes
from mythos_jax.kernels.dispatch import (KernelTarget, kernel_target, log_once,
                                         unsupported_reason)
from mythos_jax.kernels.reference import mla_decode_reference
from mythos_jax.kernels.sharding import per_shard

_BACKENDS = {"gpu": mla_decode_gpu, "tpu": mla_decode_tpu}
# Roles of the dimensions of (q_latent, q_rope, c_kv, k_rope, kv_start, kv_end), by which
# ``sharding.per_shard`` splits them (and the output, like q_latent) as ``spec`` says.
_PER_HEAD = ("batch", "heads", None)
_IN_AXES = (_PER_HEAD, _PER_HEAD, ("batch", None, None), ("batch", None, None), ("batch",),
            ("batch",))
# Programs to aim for when num_splits is None: enough to fill an H100/H200's SMs; a TPU
# chip has at most 2 TensorCores to spread a "parallel" grid axis over.
_TARGET_PROGRAMS = {"gpu": 128, "tpu": 2}


@dataclasses.dataclass(frozen=True)
class DecodeBlocks:
    """Tile sizes: ``block_h`` heads x ``block_k`` cache slots; ``num_splits`` ranges of the
    cache (None: enough for the backend's parallelism); Triton's ``num_warps``/``num_stages``."""
    block_h: int = 16
    block_k: int = 64
    num_splits: int | None = None
    num_warps: int | None = None
    num_stages: int = 2

    def __post_init__(self):
        check_block_sizes(self)


DEFAULT_BLOCKS = {"gpu": DecodeBlocks(), "tpu": DecodeBlocks(block_h=128, block_k=256)}


class DecodePlan(NamedTuple):
    """Tiles of one decode call: heads and slots per tile, and the split of the cache."""
    block_h: int
    block_k: int
    num_splits: int
    blocks_per_split: int


def plan_decode(batch: int, heads: int, length: int, blocks: DecodeBlocks,
                backend: str) -> DecodePlan:
    """Backend-legal tile sizes, and ``num_splits`` ranges of whole tiles covering the cache
    (None: enough splits for batch x head blocks to reach the backend's parallelism)."""
    tile_rows = _BACKENDS[backend].tile_rows
    block_h, block_k = tile_rows(blocks.block_h, heads), tile_rows(blocks.block_k, length)
    n_blocks = -(-length // block_k)
    programs = batch * -(-heads // block_h)
    wanted = blocks.num_splits or -(-_TARGET_PROGRAMS[backend] // programs)
    per_split = -(-n_blocks // max(1, min(wanted, n_blocks)))
    return DecodePlan(block_h, block_k, -(-n_blocks // per_split), per_split)


def combine_splits(out_parts: jax.Array, lse_parts: jax.Array) -> jax.Array:
    """out_parts (B, P, H, C) normalised per split, lse_parts (B, P, H) -> (B, H, C) fp32."""
    top = jnp.max(lse_parts, axis=1, keepdims=True)
    weights = jnp.exp(lse_parts - jnp.where(jnp.isfinite(top), top, 0.0))   # empty split: 0
    total = jnp.sum(weights, axis=1)
    out = jnp.sum(weights[..., None] * out_parts, axis=1)     # fp32 exactly, not a matmul
    return out / jnp.where(total > 0, total, 1.0)[..., None]


def mla_decode_attention(q_latent, q_rope, c_kv, k_rope, kv_start, kv_end, *, scale: float,
                         spec: PartitionSpec | None = None, blocks: DecodeBlocks | None = None,
                         target: KernelTarget | None = None) -> jax.Array:
    """Latent attention of one token per sequence over the cache (module docstring).
    ``spec``: the split of (B, H) over the mesh in force, e.g. ``P(("data", "fsdp"),
    "tensor")``."""
    _check_shapes(q_latent, q_rope, c_kv, k_rope, kv_start, kv_end)
    target = kernel_target() if target is None else target
    kv_start = jnp.asarray(kv_start, jnp.int32)
    kv_end = jnp.asarray(kv_end, jnp.int32)
    dims = {"kv_lora": c_kv.shape[-1], "rope": k_rope.shape[-1]}
    reason = unsupported_reason(dims, c_kv.dtype, target)
    if reason is not None:
        log_once(f"mla_decode_attention falls back to XLA on {target.backend}: {reason}")
        return mla_decode_reference(q_latent, q_rope, c_kv, k_rope, kv_start, kv_end,
                                    scale=scale)
    blocks = DEFAULT_BLOCKS[target.backend] if blocks is None else blocks
    kernel = per_shard(lambda *arrays: _decode(*arrays, float(scale), blocks, target),
                       _IN_AXES, spec)
    return kernel(q_latent, q_rope, c_kv, k_rope, kv_start, kv_end)


def _decode(q_latent, q_rope, c_kv, k_rope, kv_start, kv_end, scale, blocks, target):
    """The kernel and the combine of its splits on one shard (the arrays of
    ``mla_decode_attention``, local batch and heads) -> (B, H, kv_lora)."""
    plan = plan_decode(q_latent.shape[0], q_latent.shape[1], c_kv.shape[1], blocks,
                       target.backend)
    out_parts, lse_parts = _BACKENDS[target.backend].partials(
        q_latent, q_rope, c_kv, k_rope, kv_start, kv_end, scale=scale, plan=plan,
        blocks=blocks, interpret=target.interpret)
    return combine_splits(out_parts, lse_parts).astype(c_kv.dtype)


def _check_shapes(q_latent, q_rope, c_kv, k_rope, kv_start, kv_end) -> None:
    """ValueError naming the first array whose shape does not fit the others, or mixed dtypes."""
    if q_latent.ndim != 3 or c_kv.ndim != 3:
        raise ValueError(f"q_latent must be (B, H, kv_lora) and c_kv (B, S, kv_lora), got "
                         f"{q_latent.shape} and {c_kv.shape}")
    batch, heads, latent = q_latent.shape
    length = c_kv.shape[1]
    expected = {"c_kv": (c_kv, (batch, length, latent)),
                "q_rope": (q_rope, (batch, heads, q_rope.shape[-1])),
                "k_rope": (k_rope, (batch, length, q_rope.shape[-1])),
                "kv_start": (jnp.asarray(kv_start), (batch,)),
                "kv_end": (jnp.asarray(kv_end), (batch,))}
    for name, (array, shape) in expected.items():
        if array.shape != shape:
            raise ValueError(f"{name} must have shape {shape} to match q_latent "
                             f"{q_latent.shape} and c_kv {c_kv.shape}, got {array.shape}")
    dtypes = {x.dtype for x in (q_latent, q_rope, c_kv, k_rope)}
    if len(dtypes) > 1:
        raise ValueError(f"q_latent, q_rope, c_kv and k_rope must share one dtype, got "
                         f"{sorted(d.name for d in dtypes)}")
