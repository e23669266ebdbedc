"""LoopSpec: how many times the shared block runs in one forward, when it may stop, and how
gradients flow; validated once, where it is made.

    LoopSpec(8)                                   8 loops, one lax.scan (the parity path)
    LoopSpec(counts)                              counts (B,) or () chosen at run time
    LoopSpec(16, exit="kl", threshold=1e-3)       stop each sequence when its rule fires
    LoopSpec(counts, backprop_depth=4)            training: gradient through the last 4 loops
    LoopSpec(counts, max_loops=8)                 training: full backprop, masked to 8

Counts that are concrete (a Python int, a NumPy or concrete JAX array) are range-checked
here; traced counts only by ``check_traced_counts``, a host callback the forward adds when
asked to (``host_checks=True``), never by default inside a jitted step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mythos_jax.modes import ExitRule


@dataclasses.dataclass(frozen=True, eq=False)
class LoopSpec:
    """``count``: None (``MythosConfig.max_loop_iters``), a Python int (static), or an integer
    array, scalar or per sequence (B,), possibly traced. ``exit`` (an :class:`ExitRule` name)
    with ``threshold``: early exit, inference only. ``backprop_depth``: gradient through the
    last k loops (counts chosen at run time, memory independent of the count). ``max_loops``:
    the static bound of run-time counts (full backprop masks a scan to it), unrelated to
    ``MythosConfig.max_loop_iters`` (the default count)."""

    count: Any = None
    exit: ExitRule | None = None
    threshold: float = 1e-3
    backprop_depth: int | None = None
    max_loops: int | None = None

    def __post_init__(self) -> None:
        if self.exit is not None:
            object.__setattr__(self, "exit", ExitRule.parse(self.exit, "exit"))
        check_bounds(self.backprop_depth, self.max_loops)
        if self.exit is not None and self.backprop_depth is not None:
            raise ValueError("early exit is for inference; it cannot be combined with "
                             "backprop_depth")
        count = self.count
        if count is None:
            return
        if isinstance(count, bool) or not (isinstance(count, (int, np.integer))
                                           or hasattr(count, "dtype")):
            raise TypeError(f"loops must be an int, an integer array or None, got "
                            f"{type(count).__name__}")
        if isinstance(count, np.integer):
            object.__setattr__(self, "count", int(count))
        elif not isinstance(count, int) and not jnp.issubdtype(count.dtype, jnp.integer):
            raise TypeError(f"loops must be an integer count, got dtype {count.dtype}")
        if not isinstance(self.count, jax.core.Tracer):
            counts = np.asarray(self.count)
            raise_if_bad_counts(counts.min(), counts.max(), self.max_loops)

    @classmethod
    def of(cls, loops, n_loops=None) -> "LoopSpec":
        """A LoopSpec as is; a count (or None) as ``LoopSpec(count)``. ``n_loops``:
        OpenMythos's name for ``loops``, accepted for ported code (give one of the two)."""
        if n_loops is not None:
            if loops is not None:
                raise ValueError("give loops or n_loops (OpenMythos's name for it), not both")
            loops = n_loops
        return loops if isinstance(loops, LoopSpec) else cls(loops)

    def with_default_count(self, count: int) -> "LoopSpec":
        """This spec, its count ``count`` where it has none (a config's ``max_loop_iters``)."""
        return self if self.count is not None else self.replace(count=count)

    @property
    def static(self) -> bool:
        """True when the count is a Python int (one scan, compiled per count)."""
        return isinstance(self.count, int)

    @property
    def trains(self) -> bool:
        """True for the differentiable run-time driver (truncated or masked full backprop)."""
        return self.backprop_depth is not None or (self.max_loops is not None
                                                   and self.exit is None)

    def replace(self, **changes) -> "LoopSpec":
        return dataclasses.replace(self, **changes)

    def check_traced_counts(self) -> None:
        """The range check of a traced count, as a host callback (one round trip per call)."""
        if isinstance(self.count, jax.core.Tracer):
            jax.debug.callback(raise_if_bad_counts, jnp.min(self.count), jnp.max(self.count),
                               self.max_loops)


def check_bounds(backprop_depth, max_loops) -> None:
    """``backprop_depth`` and ``max_loops``: None or an int >= 1 (ValueError naming them)."""
    for name, value in (("backprop_depth", backprop_depth), ("max_loops", max_loops)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}")


def raise_if_bad_counts(lowest, highest, max_loops) -> None:
    if lowest < 1:
        raise ValueError(f"loops must be >= 1, got {int(lowest)}")
    if max_loops is not None and highest > max_loops:
        raise ValueError(f"loops {int(highest)} is above the compiled bound "
                         f"max_loops={max_loops}")


def per_sequence(count, batch: int) -> jax.Array:
    """A loop count (scalar or (B,)) as int32 (B,)."""
    n = jnp.asarray(count)
    if n.ndim > 1 or (n.ndim == 1 and n.shape[0] != batch):
        raise ValueError(f"loops must be a scalar or have shape (batch,)=({batch},), "
                         f"got shape {n.shape}")
    return jnp.broadcast_to(n.astype(jnp.int32), (batch,))
