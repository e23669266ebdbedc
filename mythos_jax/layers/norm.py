"""RMSNorm as in OpenMythos: ``x * rsqrt(mean(x^2) + eps) * weight``, computed in fp32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

RMS_EPS = 1e-6  # hard-coded in every OpenMythos RMSNorm


class RMSNorm(nnx.Module):
    """Root-mean-square norm over the last axis; weight (dim,) initialised to ones."""

    def __init__(self, dim: int, *, axis_name: str = "embed", eps: float = RMS_EPS):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=(axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., dim) -> (..., dim) in the input dtype; statistics in fp32."""
        x32 = x.astype(jnp.float32)
        inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (x32 * inv_rms * self.weight[...]).astype(x.dtype)
