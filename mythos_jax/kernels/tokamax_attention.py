"""MLA flash attention through tokamax's ``dot_product_attention`` (``attention_impl="tokamax"``).

    out = tokamax_mla_attention(q_nope, q_rope, k_nope, k_rope, v, kv_start, scale=scale,
                                implementation="mosaic_gpu")

Shapes as ``mla_flash.mla_flash_attention``: heads-major (B, H, T, d), k_rope (B, T, rope),
kv_start (B,) -> (B, H, T, v_dim). tokamax takes one query/key head dim (nope + rope) and a
different value head dim, so q = [q_nope | q_rope] and k = [k_nope | k_rope per head]; our
``masks`` rule (causal from kv_start, a padding row sees itself) is tokamax's causal mask with
a per-row ``k_start = min(kv_start, row)``. Differentiable by tokamax's own VJP.

tokamax (an optional dependency: ``pip install mythos-jax[gpu]``) is imported on first use.
``TESTED_VERSION`` is the release our tests and ``experiments/device_check.py`` ran against;
the per-row ``k_start`` needs its ``Mask`` class, which the public API does not export yet.
Implementations by platform: "mosaic_gpu" on Hopper/Blackwell NVIDIA GPUs (bf16/fp16 only:
its backward kernels run on sm90/sm100), "mosaic_tpu" on TPU v5 and later, "xla" elsewhere.
"""

from __future__ import annotations

import functools
import importlib
import re

import jax
import jax.numpy as jnp

TESTED_VERSION = "0.0.17"
MOSAIC_GPU_DTYPES = tuple(jnp.dtype(d) for d in ("bfloat16", "float16"))
# device_kind of the NVIDIA GPUs tokamax's Mosaic GPU forward and backward kernels cover
# (compute capability 9.x: H100/H200/H800/H20/GH200; 10.x: B100/B200/B300/GB200/GB300).
_MOSAIC_GPU_KINDS = re.compile(r"NVIDIA (G?H(100|200|800|20)|G?B(100|200|300))\b")
_TPU_GENERATION = re.compile(r"TPU\s*v?(\d+)")
# Largest q/k and v head dims we let Mosaic GPU take (its tiles hold whole heads in shared
# memory; tokamax's own tests go to 256). Not measured here: a guard, to revisit on hardware.
MOSAIC_GPU_MAX_HEAD_DIM = 256


@functools.cache
def import_tokamax():
    """(tokamax module, None) or (None, why it cannot be imported)."""
    try:
        return importlib.import_module("tokamax"), None
    except ImportError as error:
        return None, f"tokamax is not installed ({error}); pip install mythos-jax[gpu]"


def tpu_generation(device_kind: str) -> int | None:
    """"TPU v5p" -> 5, "TPU7x" -> 7; None for a kind that names no TPU generation."""
    match = _TPU_GENERATION.match(device_kind)
    return int(match.group(1)) if match else None


def implementation(platform: str, device_kind: str) -> tuple[str | None, str | None]:
    """(tokamax implementation name, None) for this platform/device, or (None, reason)."""
    if import_tokamax()[0] is None:
        return None, import_tokamax()[1]
    if platform == "gpu":
        if _MOSAIC_GPU_KINDS.match(device_kind):
            return "mosaic_gpu", None
        return None, f"tokamax Mosaic GPU needs a Hopper or Blackwell GPU, got {device_kind!r}"
    if platform == "tpu":
        generation = tpu_generation(device_kind)
        if generation is not None and generation >= 5:
            return "mosaic_tpu", None
        return None, f"tokamax Mosaic TPU needs TPU v5 or later, got {device_kind!r}"
    return "xla", None


def unsupported_reason(platform: str, device_kind: str, dtype,
                       head_dims: dict[str, int]) -> str | None:
    """Why tokamax cannot run this attention here (missing package, device, dtype, head dims
    ``{"qk": nope + rope, "v": v_dim}``), or None."""
    name, reason = implementation(platform, device_kind)
    if reason is not None or name != "mosaic_gpu":
        return reason
    if jnp.dtype(dtype) not in MOSAIC_GPU_DTYPES:
        return f"dtype {jnp.dtype(dtype).name} on tokamax Mosaic GPU (bfloat16, float16 only)"
    too_big = {dim: size for dim, size in head_dims.items() if size > MOSAIC_GPU_MAX_HEAD_DIM}
    if too_big:
        return f"head dims {too_big} > {MOSAIC_GPU_MAX_HEAD_DIM} on tokamax Mosaic GPU"
    return None


def tokamax_mla_attention(q_nope, q_rope, k_nope, k_rope, v, kv_start, *, scale: float,
                          implementation: str):
    """Causal MLA attention with left padding by tokamax ``implementation`` (module docstring).
    Shapes are checked by the caller (``mla_flash.mla_flash_attention``)."""
    from tokamax._src.ops.attention import api, base

    batch, heads, length, _ = q_nope.shape
    shared_rope = jnp.broadcast_to(k_rope[:, None], (batch, heads, length, k_rope.shape[-1]))
    seq_major = lambda x: x.transpose(0, 2, 1, 3)    # (B, H, T, d) <-> (B, T, H, d)  # noqa: E731
    query = seq_major(jnp.concatenate([q_nope, q_rope], axis=-1))
    key = seq_major(jnp.concatenate([k_nope, shared_rope], axis=-1))
    rows = jnp.arange(length, dtype=jnp.int32)
    k_start = jnp.minimum(jnp.asarray(kv_start, jnp.int32)[:, None], rows[None])[:, None]
    mask = base.Mask(is_causal=True, k_start=k_start)                    # k_start (B, 1, T)
    out = api.IMPLEMENTATIONS[implementation](query, key, seq_major(v), mask=mask,
                                              logits_scale=float(scale))
    return seq_major(out).astype(v.dtype)
