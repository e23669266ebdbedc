"""Small helpers shared by the layers: dtypes, the initialiser, Linear layers, dropout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mythos_jax.config import MythosConfig

# OpenMythos `_init_weights`: every nn.Linear / nn.Embedding weight ~ N(0, 0.02).
INIT_STD = 0.02
normal_init = nnx.initializers.normal(INIT_STD)


def compute_dtype(cfg: MythosConfig) -> jnp.dtype:
    """The dtype matmuls run in (parameters are always fp32)."""
    return jnp.dtype(cfg.dtype)


def linear(in_features: int, out_features: int, axes: tuple[str, str], *, rngs: nnx.Rngs,
           dtype: jnp.dtype = jnp.float32, use_bias: bool = False, bias_init=None) -> nnx.Linear:
    """A Linear layer with OpenMythos's init; kernel (in, out) tagged with logical ``axes``."""
    extra = {} if bias_init is None else {"bias_init": bias_init}
    return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype,
                      kernel_init=normal_init, kernel_metadata={"logical_axes": axes},
                      rngs=rngs, **extra)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when ``key`` is None (eval mode) or ``rate`` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def split_key(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    """``n`` independent keys from ``key``, or ``n`` Nones when dropout is off."""
    if key is None:
        return [None] * n
    return list(jax.random.split(key, n))
