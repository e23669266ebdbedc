"""Depth samplers for training: how many loops each step (or each sequence) runs.

``Fixed``, ``Uniform``, ``Poisson`` (Parcae), ``LogNormalPoisson`` (Huginn) and ``Curriculum``
(a Poisson / LogNormalPoisson whose mean ramps up); :func:`sample_loops` draws from one of
them or from a user function. A schedule turns its counts into the forward's
:class:`~mythos_jax.loops.LoopSpec` (``loop_spec``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from mythos_jax.loops.spec import LoopSpec, check_bounds, per_sequence


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A loop-count distribution for training. ``sample(step, key, batch)`` gives int32 counts,
    one per sequence (``per_sequence=True``, shape (B,)) or one per step (scalar).
    ``backprop_depth``: gradient through the last k loops only (None: all, masked to
    ``max_loops``). ``max_loops``: the static bound the counts are clipped to."""

    backprop_depth: int | None = dataclasses.field(default=None, kw_only=True)
    per_sequence: bool = dataclasses.field(default=False, kw_only=True)
    max_loops: int = dataclasses.field(default=64, kw_only=True)

    def __post_init__(self) -> None:
        check_bounds(self.backprop_depth, self.max_loops)
        if not self.mean > 0:
            raise ValueError(f"{type(self).__name__}: the mean loop count must be positive, "
                             f"got {self.mean}")

    @property
    def mean(self) -> float:
        """The mean loop count (a field of ``Poisson`` and ``LogNormalPoisson``)."""
        raise NotImplementedError

    def draw(self, key: jax.Array, shape: tuple[int, ...], step) -> jax.Array:
        """Counts (before clipping) of the given shape."""
        raise NotImplementedError

    def sample(self, step, key: jax.Array, batch: int) -> jax.Array:
        shape = (batch,) if self.per_sequence else ()
        return jnp.clip(self.draw(key, shape, step), 1, self.max_loops).astype(jnp.int32)

    def loop_spec(self, counts) -> LoopSpec:
        """The training forward's spec for counts drawn by ``sample``: the last
        ``backprop_depth`` loops differentiated, or full backprop masked to ``max_loops``."""
        if self.backprop_depth is not None:
            return LoopSpec(counts, backprop_depth=self.backprop_depth)
        return LoopSpec(counts, max_loops=self.max_loops)


@dataclasses.dataclass(frozen=True)
class Fixed(Schedule):
    """Always ``n`` loops."""
    n: int = 8

    @property
    def mean(self) -> float:
        return self.n

    def draw(self, key, shape, step):
        return jnp.full(shape, self.n, jnp.int32)

    def loop_spec(self, counts) -> LoopSpec:
        """A count that never varies is static (one scan, as the parity path) unless the
        gradient is truncated."""
        if self.backprop_depth is None:
            return LoopSpec(min(self.n, self.max_loops))
        return super().loop_spec(counts)


@dataclasses.dataclass(frozen=True)
class Uniform(Schedule):
    """Uniform over ``lo .. hi`` inclusive."""
    lo: int = 1
    hi: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.lo <= self.hi:
            raise ValueError(f"Uniform needs 1 <= lo <= hi, got lo={self.lo}, hi={self.hi}")
        super().__post_init__()

    @property
    def mean(self) -> float:
        return (self.lo + self.hi) / 2

    def draw(self, key, shape, step):
        return jax.random.randint(key, shape, self.lo, self.hi + 1)


@dataclasses.dataclass(frozen=True)
class Poisson(Schedule):
    """Parcae: ``max(1, Poisson(mean))``."""
    mean: float = 8.0

    def draw(self, key, shape, step, mean=None):
        rate = self.mean if mean is None else mean
        return jnp.maximum(1, jax.random.poisson(key, rate, shape))


@dataclasses.dataclass(frozen=True)
class LogNormalPoisson(Schedule):
    """Huginn: ``tau ~ N(log mean - sigma^2 / 2, sigma)``, ``n = Poisson(exp(tau)) + 1``."""
    mean: float = 32.0
    sigma: float = 0.5

    def draw(self, key, shape, step, mean=None):
        mean = self.mean if mean is None else mean
        tau_key, count_key = jax.random.split(key)
        tau = jnp.log(mean) - self.sigma ** 2 / 2 + self.sigma * jax.random.normal(tau_key, shape)
        return jax.random.poisson(count_key, jnp.exp(tau), shape) + 1


@dataclasses.dataclass(frozen=True)
class Curriculum(Schedule):
    """Moves the mean of ``target`` (a Poisson or LogNormalPoisson) from ``start_mean`` to
    ``target.mean`` over ``ramp_steps`` steps, linearly or as ``1 - sqrt(1 - x)``; the
    gradient depth, per-sequence flag and bound of ``target`` apply."""
    target: Poisson | LogNormalPoisson = dataclasses.field(default_factory=Poisson)
    start_mean: float = 1.0
    ramp_steps: int = 1000
    shape: str = "linear"

    def __post_init__(self) -> None:
        if not isinstance(self.target, (Poisson, LogNormalPoisson)):
            raise TypeError("Curriculum target must be a Poisson or LogNormalPoisson schedule")
        if not self.start_mean > 0:
            raise ValueError(f"Curriculum: start_mean must be positive, got {self.start_mean}")
        if self.shape not in ("linear", "sqrt"):
            raise ValueError(f"Curriculum shape must be 'linear' or 'sqrt', got {self.shape!r}")
        for name in ("backprop_depth", "per_sequence", "max_loops"):
            object.__setattr__(self, name, getattr(self.target, name))
        super().__post_init__()

    @property
    def mean(self) -> float:
        return self.target.mean

    def mean_at(self, step) -> jax.Array:
        progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(self.ramp_steps, 1), 0.0, 1.0)
        if self.shape == "sqrt":
            progress = 1.0 - jnp.sqrt(1.0 - progress)
        return self.start_mean + (self.target.mean - self.start_mean) * progress

    def draw(self, key, shape, step):
        return self.target.draw(key, shape, step, mean=self.mean_at(step))


def sample_loops(schedule: Schedule | Callable[[Any, jax.Array], Any], step, key: jax.Array,
                 batch: int) -> jax.Array:
    """Counts for this step from a :class:`Schedule` or a user function ``f(step, key)``
    returning a scalar or per-sequence (B,) integer count (jittable: step may be traced)."""
    if isinstance(schedule, Schedule):
        return schedule.sample(step, key, batch)
    if not callable(schedule):
        raise TypeError(f"expected a mythos_jax.schedules.Schedule or a function (step, key) -> "
                        f"count(s), got {type(schedule).__name__}")
    return per_sequence(schedule(step, key), batch)
