"""SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``, no biases (OpenMythos ``Expert``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mythos_jax.layers.common import linear


class SwiGLU(nnx.Module):
    """Dense SwiGLU: (..., dim) -> (..., dim) through a hidden width ``hidden``."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.gate = linear(dim, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.up = linear(dim, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.down = linear(hidden, dim, ("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
