"""Every named mode of mythos-jax, one ``enum.StrEnum`` each (declarations only: this module
imports nothing of the package, so any module may use it).

A member is a ``str``: configs, YAML files and the CLI keep taking the plain names
(``MythosConfig(moe_impl="dropless")``), and ``Mode.parse(value, field)`` turns a name into its
member with a one-line error naming the field and the allowed names. The tables that depend on
a mode (the MoE dispatch strategies, the injection classes, ...) are keyed by its members next
to the code they select; ``tests/test_modes.py`` checks that each covers every member.
"""

from __future__ import annotations

import enum

import jax


class Mode(enum.StrEnum):
    """Base of every mode: a ``str`` with a checked constructor; shown as its name in messages
    (``repr`` is the plain string's)."""

    def __repr__(self) -> str:
        return repr(self.value)

    @classmethod
    def parse(cls, value, field: str):
        """``value`` (a name or a member) -> member; ValueError naming ``field`` otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{field}: must be one of {cls.names()}, got {value!r}") from None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)


class AttentionType(Mode):
    MLA = "mla"
    GQA = "gqa"


class ComputeDtype(Mode):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


class AttentionImpl(Mode):
    """How MLA attention runs (``kernels/dispatch.py``)."""
    AUTO = "auto"
    XLA = "xla"
    PALLAS = "pallas"
    TOKAMAX = "tokamax"


class MoEImpl(Mode):
    """How tokens reach their experts (the MoE dispatch strategies)."""
    GROUPED = "grouped"
    DENSE = "dense"
    DROPLESS = "dropless"
    CAPACITY = "capacity"


class LoopRemat(Mode):
    """What backprop keeps from each loop iteration; ``policy`` is its ``jax.checkpoint``
    policy (None: no rematerialisation)."""
    DOTS = "dots"
    FULL = "full"
    NONE = "none"

    @property
    def policy(self):
        return {LoopRemat.DOTS: jax.checkpoint_policies.dots_saveable,
                LoopRemat.FULL: jax.checkpoint_policies.nothing_saveable,
                LoopRemat.NONE: None}[self]


class ACTMode(Mode):
    """What the recurrence outputs: the ACT-weighted sum (OpenMythos), the same with the
    unspent mass flushed onto the last state, or the last state."""
    OPENMYTHOS = "openmythos"
    FLUSH = "flush"
    OFF = "off"


class Injection(Mode):
    """How the input re-enters the loop: OpenMythos's LTI form, Parcae's, plain addition, or
    a learned unconstrained decay and input matrix ("free": Parcae's unstable baseline)."""
    OPENMYTHOS = "openmythos"
    PARCAE = "parcae"
    ADDITIVE = "additive"
    FREE = "free"

    @property
    def input_matrix(self) -> bool:
        """True when e enters through a full (D, D) matrix (``e @ B.T``: one matmul per loop)."""
        return self in (Injection.PARCAE, Injection.FREE)


class Positions(Mode):
    """Where attention rotates queries and keys by position (RoPE): every layer
    (OpenMythos), the prelude and coda only ("nope_loop"), or none ("nope": causal mask
    only). Unrotated, the rope dims act as content dims."""
    ROPE = "rope"
    NOPE_LOOP = "nope_loop"
    NOPE = "nope"


class ExitRule(Mode):
    """When a sequence stops looping early (``mythos_jax.loops``)."""
    ACT = "act"
    KL = "kl"
    KL_ENTROPY = "kl_entropy"
    DELTA = "delta"

    @property
    def decodes(self) -> bool:
        """True when the rule reads next-token distributions (runs the coda every loop)."""
        return self in (ExitRule.KL, ExitRule.KL_ENTROPY)


class GroupedMatmul(Mode):
    """The grouped matmul of the "dropless" MoE dispatch."""
    AUTO = "auto"
    RAGGED_DOT = "ragged_dot"
    MEGABLOX = "megablox"
    TOKAMAX = "tokamax"


class ScheduleKind(Mode):
    """The loop-count distributions of training (``mythos_jax.schedules``)."""
    FIXED = "fixed"
    UNIFORM = "uniform"
    POISSON = "poisson"
    LOGNORMAL_POISSON = "lognormal_poisson"
    CURRICULUM = "curriculum"
