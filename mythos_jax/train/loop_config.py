"""``TrainConfig.loops``: the loop count per training step, one section class per schedule.

``schedule`` picks the class (``mythos_jax.modes.ScheduleKind``); each builds its
``mythos_jax.schedules`` sampler::

    loops: {schedule: fixed, n: 4}
    loops: {schedule: uniform, lo: 1, hi: 8}
    loops: {schedule: poisson, mean: 4}                     # Parcae: max(1, Poisson(mean))
    loops: {schedule: lognormal_poisson, mean: 8, sigma: 0.5}   # Huginn
    loops: {schedule: curriculum, start_mean: 1, ramp_steps: 1000, shape: linear,
            target: {schedule: lognormal_poisson, mean: 8, max_loops: 16}}

Every schedule but the curriculum takes ``per_sequence`` (one count per sequence instead of
per step), ``max_loops`` (counts are clipped to it; it bounds the masked full-backprop scan)
and ``backprop_depth`` (gradient through the last k loops only; None: through all); a
curriculum takes them from its target (a poisson or lognormal_poisson schedule), whose mean
it ramps up from ``start_mean`` over ``ramp_steps`` steps.
"""

from __future__ import annotations

import dataclasses

from mythos_jax import schedules
from mythos_jax.modes import ScheduleKind
from mythos_jax.train.config_parse import Choice, fail


@dataclasses.dataclass(frozen=True)
class LoopsConfig(Choice):
    """A schedule section: ``build()`` gives its sampler."""
    key = "schedule"
    noun = "schedule"
    default = ScheduleKind.POISSON

    def validate(self, path: str = "loops") -> None:
        raise NotImplementedError

    def build(self) -> schedules.Schedule:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class SampledLoops(LoopsConfig):
    """The fields every sampler but the curriculum has (see the module docstring)."""
    per_sequence: bool = False
    max_loops: int = 8
    backprop_depth: int | None = None

    def validate(self, path: str = "loops") -> None:
        if self.max_loops < 1:
            fail(f"{path}.max_loops", f"must be >= 1, got {self.max_loops}")
        if self.backprop_depth is not None and self.backprop_depth < 1:
            fail(f"{path}.backprop_depth", f"must be >= 1 or null, got {self.backprop_depth}")

    def _common(self) -> dict:
        return dict(backprop_depth=self.backprop_depth, per_sequence=self.per_sequence,
                    max_loops=self.max_loops)


@dataclasses.dataclass(frozen=True)
class FixedLoops(SampledLoops):
    """Always ``n`` loops (at most ``max_loops``)."""
    schedule = ScheduleKind.FIXED
    n: int = 4

    def build(self) -> schedules.Fixed:
        return schedules.Fixed(n=self.n, **self._common())


@dataclasses.dataclass(frozen=True)
class UniformLoops(SampledLoops):
    """Uniform over ``lo .. hi`` inclusive."""
    schedule = ScheduleKind.UNIFORM
    lo: int = 1
    hi: int = 8

    def build(self) -> schedules.Uniform:
        return schedules.Uniform(lo=self.lo, hi=self.hi, **self._common())


@dataclasses.dataclass(frozen=True)
class PoissonLoops(SampledLoops):
    """Parcae: ``max(1, Poisson(mean))``."""
    schedule = ScheduleKind.POISSON
    mean: float = 4.0

    def build(self) -> schedules.Poisson:
        return schedules.Poisson(mean=self.mean, **self._common())


@dataclasses.dataclass(frozen=True)
class LogNormalPoissonLoops(SampledLoops):
    """Huginn: a Poisson count whose log-rate is normal with spread ``sigma``."""
    schedule = ScheduleKind.LOGNORMAL_POISSON
    mean: float = 4.0
    sigma: float = 0.5

    def build(self) -> schedules.LogNormalPoisson:
        return schedules.LogNormalPoisson(mean=self.mean, sigma=self.sigma,
                                          **self._common())


@dataclasses.dataclass(frozen=True)
class CurriculumLoops(LoopsConfig):
    """The mean of ``target`` ramps from ``start_mean`` over ``ramp_steps`` steps, linearly or
    as ``1 - sqrt(1 - x)`` (``shape``: "linear" or "sqrt")."""
    schedule = ScheduleKind.CURRICULUM
    target: LoopsConfig = dataclasses.field(default_factory=PoissonLoops)
    start_mean: float = 1.0
    ramp_steps: int = 1000
    shape: str = "linear"

    def validate(self, path: str = "loops") -> None:
        if not isinstance(self.target, (PoissonLoops, LogNormalPoissonLoops)):
            fail(f"{path}.target.schedule", "a curriculum ramps a poisson or lognormal_poisson "
                                            f"schedule, got {str(self.target.schedule)!r}")
        self.target.validate(f"{path}.target")

    def build(self) -> schedules.Curriculum:
        return schedules.Curriculum(target=self.target.build(), start_mean=self.start_mean,
                                    ramp_steps=self.ramp_steps, shape=self.shape)

    @property
    def per_sequence(self) -> bool:
        return self.target.per_sequence

    @property
    def max_loops(self) -> int:
        return self.target.max_loops

    @property
    def backprop_depth(self) -> int | None:
        return self.target.backprop_depth
