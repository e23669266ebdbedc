"""MLA flash attention: causal with left padding, q/k head dim (nope + rope) != v head dim.

    out = mla_flash_attention(q_nope, q_rope, k_nope, k_rope, v, kv_start, scale=scale)

q_nope (B, H, T, nope), q_rope (B, H, T, rope), k_nope (B, H, T, nope), k_rope (B, T, rope)
(the ONE rotated key head that MLA shares across query heads; never broadcast in memory),
v (B, H, T, v_dim), kv_start (B,) int (None: plain causal; see ``masks``) -> (B, H, T, v_dim)
in v's dtype. Scores ``(q . k) * scale`` and the online softmax run in fp32.

Differentiable: a ``jax.custom_vjp`` whose backward is two more kernels (dq; dk and dv), with
the fp32 log-sum-exp of the forward as residual; k_rope's gradient sums over heads. Backends:
``mla_flash_gpu`` (Triton) and ``mla_flash_tpu`` (Mosaic), picked by
``dispatch.kernel_target`` unless ``target`` is given; interpreted off GPU/TPU. A shape the
backend cannot tile falls back to ``reference.mla_flash_reference`` (XLA), logged once.
``tokamax=True`` runs tokamax's flash attention instead (``tokamax_attention``) where it can,
else these kernels, logged once.
Under a mesh (``jax.set_mesh``) the kernels run per shard as ``spec`` says: the
PartitionSpec of the (B, H) dimensions, computed by the caller from its sharding rules
(``sharding.per_shard``); None runs them on the whole arrays.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mythos_jax.kernels import mla_flash_gpu, mla_flash_tpu, tokamax_attention
from mythos_jax.kernels.tiles import check_block_sizes
from mythos_jax.kernels.dispatch import (KernelTarget, kernel_target, log_once,
                                         mesh_device_kind, mesh_platform, unsupported_reason)
from mythos_jax.kernels.reference import mla_flash_reference
from mythos_jax.kernels.sharding import per_shard

_BACKENDS = {"gpu": mla_flash_gpu, "tpu": mla_flash_tpu}
# Roles of the dimensions of (q_nope, q_rope, k_nope, k_rope, v, kv_start), by which
# ``sharding.per_shard`` splits them (and the output, like q_nope) as ``spec`` says.
_PER_HEAD = ("batch", "heads", None, None)
_IN_AXES = (_PER_HEAD, _PER_HEAD, _PER_HEAD, ("batch", None, None), _PER_HEAD, ("batch",))


@dataclasses.dataclass(frozen=True)
class FlashBlocks:
    """Tile rows of the forward (block_q x block_k) and backward kernels; ``num_warps`` (None:
    by head dim) and ``num_stages`` tune Triton only. Blocks longer than the sequence shrink
    to it; on TPU a block shorter than the sequence must be a multiple of 8."""
    block_q: int = 128
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int | None = None
    num_stages: int = 2

    def __post_init__(self):
        check_block_sizes(self)


DEFAULT_BLOCKS = {"gpu": FlashBlocks(), "tpu": FlashBlocks(128, 128, 128, 128)}


def mla_flash_attention(q_nope, q_rope, k_nope, k_rope, v, kv_start=None, *, scale: float,
                        spec: PartitionSpec | None = None, blocks: FlashBlocks | None = None,
                        target: KernelTarget | None = None, tokamax: bool = False):
    """Causal MLA attention (shapes in the module docstring); differentiable. ``spec``: the
    split of (B, H) over the mesh in force, e.g. ``P(("data", "fsdp"), "tensor")``."""
    _check_shapes(q_nope, q_rope, k_nope, k_rope, v, kv_start)
    batch = q_nope.shape[0]
    kv_start = (jnp.zeros((batch,), jnp.int32) if kv_start is None
                else jnp.asarray(kv_start, jnp.int32))
    arrays = (q_nope, q_rope, k_nope, k_rope, v, kv_start)
    if tokamax:
        platform, kind = mesh_platform(), mesh_device_kind()
        head_dims = {"qk": q_nope.shape[-1] + q_rope.shape[-1], "v": v.shape[-1]}
        reason = tokamax_attention.unsupported_reason(platform, kind, v.dtype, head_dims)
        if reason is None:
            name = tokamax_attention.implementation(platform, kind)[0]
            return per_shard(functools.partial(tokamax_attention.tokamax_mla_attention,
                                               scale=scale, implementation=name),
                             _IN_AXES, spec)(*arrays)
        log_once(f"mla_flash_attention runs our Pallas kernels, not tokamax: {reason}")
    target = kernel_target() if target is None else target
    dims = {"nope": q_nope.shape[-1], "rope": q_rope.shape[-1], "v_dim": v.shape[-1]}
    reason = unsupported_reason(dims, v.dtype, target)
    if reason is not None:
        log_once(f"mla_flash_attention falls back to XLA on {target.backend}: {reason}")
        return mla_flash_reference(q_nope, q_rope, k_nope, k_rope, v, kv_start, scale=scale)
    blocks = DEFAULT_BLOCKS[target.backend] if blocks is None else blocks
    kernel = per_shard(lambda *inputs: _flash(*inputs, float(scale), blocks, target),
                       _IN_AXES, spec)
    return kernel(*arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _flash(q_nope, q_rope, k_nope, k_rope, v, kv_start, scale, blocks, target):
    return _flash_forward(q_nope, q_rope, k_nope, k_rope, v, kv_start, scale, blocks, target)[0]


def _flash_forward(q_nope, q_rope, k_nope, k_rope, v, kv_start, scale, blocks, target):
    out, lse = _BACKENDS[target.backend].forward(
        q_nope, q_rope, k_nope, k_rope, v, kv_start, scale=scale, blocks=blocks,
        interpret=target.interpret)
    return out, (q_nope, q_rope, k_nope, k_rope, v, kv_start, out, lse)


def _flash_backward(scale, blocks, target, residuals, dout):
    k_rope = residuals[3]
    dq_nope, dq_rope, dk_nope, dk_rope_per_head, dv = _BACKENDS[target.backend].backward(
        *residuals, dout.astype(residuals[6].dtype), scale=scale, blocks=blocks,
        interpret=target.interpret)
    dk_rope = jnp.sum(dk_rope_per_head, axis=1).astype(k_rope.dtype)
    return dq_nope, dq_rope, dk_nope, dk_rope, dv, None


_flash.defvjp(_flash_forward, _flash_backward)


def _check_shapes(q_nope, q_rope, k_nope, k_rope, v, kv_start) -> None:
    """ValueError naming the first array whose shape does not fit the others, or mixed dtypes."""
    if q_nope.ndim != 4:
        raise ValueError(f"q_nope must be (B, H, T, nope), got shape {q_nope.shape}")
    batch, heads, length, _ = q_nope.shape
    expected = {
        "q_rope": (q_rope, (batch, heads, length, q_rope.shape[-1])),
        "k_nope": (k_nope, q_nope.shape),
        "k_rope": (k_rope, (batch, length, q_rope.shape[-1])),
        "v": (v, (batch, heads, length, v.shape[-1])),
    }
    if kv_start is not None:
        expected["kv_start"] = (jnp.asarray(kv_start), (batch,))
    for name, (array, shape) in expected.items():
        if array.shape != shape:
            raise ValueError(f"{name} must have shape {shape} to match q_nope {q_nope.shape}, "
                             f"got {array.shape}")
    dtypes = {x.dtype for x in (q_nope, q_rope, k_nope, k_rope, v)}
    if len(dtypes) > 1:
        raise ValueError(f"q_nope, q_rope, k_nope, k_rope and v must share one dtype, got "
                         f"{sorted(d.name for d in dtypes)}")
