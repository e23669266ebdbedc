"""Memory budget checks before a large allocation: caches and parameters sized by a flag or a
(possibly crafted) config are measured abstractly first (``jax.eval_shape`` /
``nnx.eval_shape``, nothing allocated) and refused with a message naming the fields.

    check_fits("the KV cache", tree_bytes(abstract_cache), "lower loops=4096 or batch=8")

The budget is ``$MYTHOS_JAX_MEMORY_LIMIT`` (bytes, e.g. ``8e9``) when set, else the device's
memory (``bytes_limit`` of its memory stats), else the host's available RAM.
"""

from __future__ import annotations

import os

import jax
import numpy as np

LIMIT_VARIABLE = "MYTHOS_JAX_MEMORY_LIMIT"


def tree_bytes(tree) -> int:
    """Bytes of every array (or ``ShapeDtypeStruct``) leaf of ``tree`` (RNG keys included:
    their dtype has an itemsize too)."""
    return sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize
               for leaf in jax.tree.leaves(tree) if hasattr(leaf, "shape"))


def per_device_bytes(tree, shardings) -> int:
    """Bytes one device holds of ``tree`` laid out by ``shardings`` (a matching tree of
    ``jax.sharding.Sharding``): each leaf's shard shape."""
    sizes = jax.tree.map(lambda leaf, sharding: int(np.prod(sharding.shard_shape(leaf.shape)))
                         * leaf.dtype.itemsize, tree, shardings)
    return sum(jax.tree.leaves(sizes))


def memory_limit(device: jax.Device | None = None) -> tuple[int, str]:
    """(bytes one allocation may take, where the figure comes from)."""
    if os.environ.get(LIMIT_VARIABLE):
        try:
            return int(float(os.environ[LIMIT_VARIABLE])), f"${LIMIT_VARIABLE}"
        except ValueError:
            raise ValueError(f"${LIMIT_VARIABLE} must be a number of bytes, got "
                             f"{os.environ[LIMIT_VARIABLE]!r}") from None
    device = device or jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), "available host RAM"


def check_fits(what: str, nbytes: int, advice: str) -> None:
    """``ValueError`` when ``nbytes`` exceed the budget; ``advice`` names the settings that
    size ``what`` with their values."""
    limit, source = memory_limit()
    if nbytes > limit:
        raise ValueError(f"{what} would need {_gib(nbytes)}, more than the {_gib(limit)} of "
                         f"{source}: {advice} (the budget: ${LIMIT_VARIABLE})")


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:,.2f} GiB"
