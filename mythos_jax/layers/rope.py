"""Rotary position embeddings, interleaved-pair (GPT-J / Meta) layout as in OpenMythos.

Pairs ``(x[2k], x[2k+1])`` are rotated by the angle ``m * theta^(-2k/d)`` of position m.
Angles and the rotation are computed in fp32; the result is cast back to the input dtype.
Tables are computed on the fly from positions (no (max_seq_len, d/2) buffer is stored).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_cos_sin(positions: jax.Array, rot_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """positions (..., T) int -> cos, sin (..., T, rot_dim // 2) fp32."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rot_dim, 2, dtype=jnp.float32) / rot_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x (B, T, H, d) by cos/sin of shape (T, d/2) or (B, T, d/2)."""
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]          # (B|1, T, 1, d/2)
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)
