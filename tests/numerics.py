"""Closeness of arrays and pytrees relative to the reference's scale, for the tests.

Every comparison is ``max|got - want| / max|want|`` (per array; per leaf for trees), so one
tolerance serves logits of order 10 and gradients of order 1e-4 alike."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def relative_error(got, want) -> float:
    """max|got - want| / max|want| in fp32 (max|got - want| itself when want is all zero)."""
    got, want = (np.asarray(jnp.asarray(x, jnp.float32)) for x in (got, want))
    if got.shape != want.shape:
        raise ValueError(f"shapes differ: got {got.shape}, want {want.shape}")
    scale = float(np.abs(want).max(initial=0.0))
    return float(np.abs(got - want).max(initial=0.0)) / (scale if scale > 0 else 1.0)


def assert_close(got, want, rtol: float, what: str = "") -> None:
    error = relative_error(got, want)
    assert error <= rtol, f"{what}: relative error {error:.3g} > {rtol:.3g}"


def assert_trees_close(got, want, rtol: float) -> None:
    """Every leaf of ``got`` within ``rtol`` of the same leaf of ``want`` (same structure)."""
    got_leaves, got_def = jax.tree_util.tree_flatten_with_path(got)
    want_leaves, want_def = jax.tree_util.tree_flatten_with_path(want)
    assert got_def == want_def, f"tree structures differ: {got_def} vs {want_def}"
    for (path, g), (_, w) in zip(got_leaves, want_leaves, strict=True):
        assert_close(g, w, rtol, jax.tree_util.keystr(path))
