"""TrainConfig: everything ``mythos-jax train`` needs, as nested frozen dataclasses.

A config comes from a preset name (``PRESETS``) or a YAML/JSON file, then ``section.field=value``
overrides, e.g. ``optim.lr=1e-3 loops.mean=6 model.dim=128 data.source=khop``::

    steps: 2000                     # optimizer updates
    seed: 0                         # parameters, loop draws and dropout (data has data.seed)
    mesh: data=-1                   # device mesh spec (mythos_jax.parallel.mesh)
    rules: default                  # logical-axis -> mesh-axis rules preset
    model: {variant: tiny_mla, dim: 128}     # a variant + MythosConfig field overrides
    data: {source: stdlib, seq_len: 128, batch_size: 16}   # mythos_jax.train.data.DataConfig
    loops: {schedule: poisson, mean: 4, max_loops: 8, backprop_depth: null}
    optim: {lr: 3e-3, warmup_steps: 100, ...}
    checkpoint: {every: 200, keep: 3}
    log: {every: 10}
    eval: {every: 500, batches: 8, loops: [1, 2, 4, 8]}

The model's ``vocab_size`` follows the data's tokenizer unless set explicitly, and its
``max_seq_len`` must cover ``data.seq_len``. Every field is documented on its dataclass.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from typing import Any

from mythos_jax import schedules, variants
from mythos_jax.config import MythosConfig
from mythos_jax.parallel.rules import RULE_PRESETS
from mythos_jax.train.config_file import load_yaml, read_mapping
from mythos_jax.train.data import DataConfig, vocab_size

SCHEDULES = ("fixed", "uniform", "poisson", "lognormal_poisson", "curriculum")


@dataclasses.dataclass(frozen=True)
class LoopsConfig:
    """Loop count per training step (``mythos_jax.loops`` samplers).

    ``schedule``: "fixed" (``n`` loops), "uniform" (``lo..hi``), "poisson" (Parcae,
    ``max(1, Poisson(mean))``), "lognormal_poisson" (Huginn, ``sigma``), "curriculum" (a
    Poisson whose mean ramps from ``start_mean`` to ``mean`` over ``ramp_steps``).
    ``per_sequence``: one count per sequence instead of per step. ``max_loops``: counts are
    clipped to it (and it bounds the masked full-backprop scan). ``backprop_depth``: gradient
    through the last k loops only (truncated backprop; None = through all).
    """
    schedule: str = "poisson"
    n: int = 4
    lo: int = 1
    hi: int = 8
    mean: float = 4.0
    sigma: float = 0.5
    start_mean: float = 1.0
    ramp_steps: int = 1000
    per_sequence: bool = False
    max_loops: int = 8
    backprop_depth: int | None = None

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            _fail("loops.schedule", f"must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.max_loops < 1:
            _fail("loops.max_loops", f"must be >= 1, got {self.max_loops}")
        if self.backprop_depth is not None and self.backprop_depth < 1:
            _fail("loops.backprop_depth", f"must be >= 1 or null, got {self.backprop_depth}")

    def build(self) -> schedules.Schedule:
        """The :class:`mythos_jax.schedules.Schedule` these fields describe."""
        common = dict(backprop_depth=self.backprop_depth, per_sequence=self.per_sequence,
                      max_loops=self.max_loops)
        if self.schedule == "fixed":
            return schedules.Fixed(n=self.n, **common)
        if self.schedule == "uniform":
            return schedules.Uniform(lo=self.lo, hi=self.hi, **common)
        if self.schedule == "poisson":
            return schedules.Poisson(mean_loops=self.mean, **common)
        if self.schedule == "lognormal_poisson":
            return schedules.LogNormalPoisson(mean_loops=self.mean, sigma=self.sigma, **common)
        return schedules.Curriculum(target=schedules.Poisson(mean_loops=self.mean, **common),
                                start_mean=self.start_mean, ramp_steps=self.ramp_steps)

    @property
    def static_count(self) -> int | None:
        """The loop count when it never varies (fixed schedule, per step), else None."""
        return min(self.n, self.max_loops) if self.schedule == "fixed" else None


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup + cosine decay and global-norm clipping.

    Weight decay applies to matrices only: norms, the LTI/Parcae injection parameters and
    every other 1-D parameter are excluded (the router bias is not a parameter at all).
    ``grad_accum``: micro-batches per update (the global batch is split, gradients summed).
    Loss = cross-entropy + ``aux_loss_weight`` * MoE balance loss + ``z_loss_weight`` *
    router z-loss + ``ponder_weight`` * mean ponder cost. ``router_bias_rate``: the
    aux-loss-free balancing step ``bias += rate * sign(mean_load - load)`` after each update
    (0 = off). ``max_nonfinite``: stop after this many non-finite steps in a row (each one
    is skipped: parameters and optimizer state unchanged).
    """
    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    grad_accum: int = 1
    aux_loss_weight: float = 0.0
    z_loss_weight: float = 0.0
    ponder_weight: float = 0.0
    router_bias_rate: float = 1e-3
    max_nonfinite: int = 10

    def validate(self) -> None:
        if not self.lr > 0:
            _fail("optim.lr", f"must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            _fail("optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            _fail("optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_accum < 1:
            _fail("optim.grad_accum", f"must be >= 1, got {self.grad_accum}")
        if self.max_nonfinite < 1:
            _fail("optim.max_nonfinite", f"must be >= 1, got {self.max_nonfinite}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints in ``<workdir>/checkpoints``: every ``every`` steps and at the end,
    the last ``keep`` kept, written asynchronously (``async_save``)."""
    every: int = 200
    keep: int = 3
    async_save: bool = True

    def validate(self) -> None:
        if self.every < 1:
            _fail("checkpoint.every", f"must be >= 1, got {self.every}")
        if self.keep < 1:
            _fail("checkpoint.keep", f"must be >= 1, got {self.keep}")


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Metrics every ``every`` steps to ``<workdir>/metrics.jsonl``, TensorBoard event files
    (``tensorboard``) and a progress bar (``progress``). ``peak_flops``: per-device peak
    FLOP/s for MFU (0: a table for TPUs/GPUs, a quick matmul measurement on CPU)."""
    every: int = 10
    tensorboard: bool = True
    progress: bool = True
    peak_flops: float = 0.0

    def validate(self) -> None:
        if self.every < 1:
            _fail("log.every", f"must be >= 1, got {self.every}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation every ``every`` steps (0: only at the end) on ``batches`` batches of each
    eval split, at each test-time loop count in ``loops`` (the depth curve)."""
    every: int = 0
    batches: int = 4
    loops: tuple[int, ...] = (1, 2, 4, 8)

    def validate(self) -> None:
        if self.every < 0:
            _fail("eval.every", f"must be >= 0, got {self.every}")
        if self.batches < 1:
            _fail("eval.batches", f"must be >= 1, got {self.batches}")
        if not self.loops or min(self.loops) < 1:
            _fail("eval.loops", f"must be loop counts >= 1, got {self.loops}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole training run; see the module docstring for the file format."""
    steps: int = 1000
    seed: int = 0
    mesh: str = "data=-1"
    rules: str = "default"
    model: dict = dataclasses.field(default_factory=lambda: {"variant": "tiny_mla"})
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loops: LoopsConfig = dataclasses.field(default_factory=LoopsConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.steps < 1:
            _fail("steps", f"must be >= 1, got {self.steps}")
        if self.rules not in RULE_PRESETS:
            _fail("rules", f"must be one of {sorted(RULE_PRESETS)}, got {self.rules!r}")
        for section in (self.data, self.loops, self.optim, self.checkpoint, self.log, self.eval):
            section.validate()
        if self.data.batch_size % self.optim.grad_accum:
            _fail("optim.grad_accum", f"must divide data.batch_size={self.data.batch_size}, "
                                      f"got {self.optim.grad_accum}")
        self.model_config()     # the model section must build

    def model_config(self) -> MythosConfig:
        """The MythosConfig: ``model.variant`` with the other ``model.*`` fields applied;
        ``vocab_size`` defaults to the data's."""
        fields = dict(self.model)
        name = fields.pop("variant", "tiny_mla")
        try:
            base = variants.get_variant(name)
        except ValueError as err:
            raise ValueError(f"model.variant: {err}") from None
        fields.setdefault("vocab_size", vocab_size(self.data))
        cfg = base.replace(**{k: _coerce_model_field(k, v) for k, v in fields.items()})
        if cfg.vocab_size < vocab_size(self.data):
            _fail("model.vocab_size", f"{cfg.vocab_size} is smaller than the data's vocabulary "
                                      f"({vocab_size(self.data)})")
        if cfg.max_seq_len < self.data.seq_len:
            _fail("model.max_seq_len", f"{cfg.max_seq_len} is shorter than data.seq_len="
                                       f"{self.data.seq_len}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> "TrainConfig":
        return _build(cls, fields, "")


# ---------------------------------------------------------------------------- presets
PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a CPU: tests and smoke runs.
    "tiny": {
        "steps": 20,
        "model": {"variant": "tiny_mla"},
        "data": {"source": "stdlib", "seq_len": 32, "batch_size": 8},
        "loops": {"schedule": "uniform", "lo": 1, "hi": 3, "max_loops": 3},
        "optim": {"lr": 3e-3, "warmup_steps": 5},
        "checkpoint": {"every": 10, "keep": 2},
        "log": {"every": 5, "progress": False},
        "eval": {"every": 0, "batches": 1, "loops": [1, 2, 4]},
    },
    # The README's main job: ~10 minutes on 2 CPU cores, byte-level LM on the stdlib sources.
    "cpu_small": {
        "steps": 2400,
        "model": {"variant": "tiny_mla", "dim": 96, "n_heads": 4, "max_seq_len": 128,
                  "max_loop_iters": 4, "n_experts": 8, "n_experts_per_tok": 2,
                  "expert_dim": 64, "kv_lora_rank": 32, "q_lora_rank": 48,
                  "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 24,
                  "act": "off"},
        "data": {"source": "stdlib", "seq_len": 128, "batch_size": 16},
        "loops": {"schedule": "poisson", "mean": 3.0, "max_loops": 6, "backprop_depth": 3},
        "optim": {"lr": 3e-3, "warmup_steps": 100},
        "checkpoint": {"every": 600, "keep": 2},
        "log": {"every": 50},
        "eval": {"every": 800, "batches": 4, "loops": [1, 2, 3, 4, 6, 8]},
    },
    # The main job (``make train``), E1's looped_random arm: k-hop composition over a knowledge
    # graph, trained on <= 4 hops with Poisson(6) loops; the depth curve shows more test-time
    # loops answering more hops (~4 min on 2 CPU cores). tests/test_experiments.py keeps it
    # equal to mythos_jax/experiments/depth_extrapolation.py's arm.
    "khop": {
        "steps": 2000,
        "model": {"variant": "tiny_mla", "act": "off", "n_experts": 1, "n_experts_per_tok": 1,
                  "expert_dim": 128, "max_seq_len": 16, "loop_embed_scale": 0.02},
        "data": {"source": "khop_graph", "seq_len": 16, "batch_size": 64, "khop_entities": 32,
                 "khop_eval_hops": list(range(1, 13)), "khop_supervision": "every_hop"},
        "loops": {"schedule": "poisson", "mean": 6.0, "max_loops": 12, "backprop_depth": 6},
        "optim": {"warmup_steps": 50},
        "checkpoint": {"every": 500, "keep": 2},
        "log": {"every": 25},
        "eval": {"loops": [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]},
    },
    # A TPU pod run (see tpu_setup/README.md); needs a tokenizer and a corpus.
    "mythos_1b": {
        "steps": 100000,
        "mesh": "data=-1,fsdp=1,expert=1",
        "model": {"variant": "mythos_1b", "dtype": "bfloat16", "loop_remat": "full"},
        "data": {"source": "arrayrecord", "seq_len": 4096, "batch_size": 256},
        "loops": {"schedule": "lognormal_poisson", "mean": 8.0, "max_loops": 16,
                  "backprop_depth": 8},
        "optim": {"lr": 3e-4, "warmup_steps": 2000, "aux_loss_weight": 0.0},
        "checkpoint": {"every": 1000, "keep": 3},
        "eval": {"every": 5000, "loops": [4, 8, 16, 32]},
    },
}


def load_train_config(source: str | None, overrides: list[str] = ()) -> TrainConfig:
    """A preset name, a ``.yaml``/``.yml``/``.json`` file or None (defaults), then
    ``section.field=value`` overrides (values parsed as YAML scalars/lists)."""
    if source is None:
        fields: dict[str, Any] = {}
    elif source in PRESETS:
        fields = json.loads(json.dumps(PRESETS[source]))
    elif os.path.exists(source):
        fields = read_mapping(source)
    else:
        raise ValueError(f"config {source!r} is neither a preset {sorted(PRESETS)} nor a file")
    for text in overrides:
        key, sep, raw = text.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {text!r}: expected section.field=value")
        *sections, name = key.strip().split(".")
        target = fields
        for section in sections:
            target = target.setdefault(section, {})
            if not isinstance(target, dict):
                raise ValueError(f"override {text!r}: {section!r} is not a section")
        target[name] = _parse_scalar(raw)
    return TrainConfig.from_dict(fields)


def _parse_scalar(raw: str) -> Any:
    import yaml
    try:
        return load_yaml(raw)
    except yaml.YAMLError:
        return raw


# ---------------------------------------------------------------------------- typed building
def _build(cls, fields: Any, path: str):
    """Instantiate dataclass ``cls`` from a mapping, coercing values to the field types;
    unknown keys and bad values raise ValueError naming ``path.field``."""
    if isinstance(fields, cls):
        return fields
    if not isinstance(fields, dict):
        raise ValueError(f"{path or 'config'}: expected a mapping, got {fields!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{path or 'config'}: unknown field(s) {unknown}; known: "
                         f"{sorted(known)}")
    values = {name: _coerce(hints[name], value, f"{path}{name}")
              for name, value in fields.items()}
    return cls(**values)


def _coerce(kind, value: Any, path: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, path + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        return _coerce(next(a for a in args if a is not type(None)), value, path)
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"{path}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], item, path) for item in items)
    if kind is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected a mapping, got {value!r}")
        return value
    return _coerce_scalar(kind, value, path)


def _coerce_scalar(kind, value: Any, path: str) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind in (int, float) and not isinstance(value, bool):
        try:
            number = float(value) if kind is float else int(str(value), 10)
            return number
        except (TypeError, ValueError):
            pass
    elif kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{path}: expected {kind.__name__}, got {value!r}")


def _coerce_model_field(name: str, value: Any) -> Any:
    fields = {f.name: f for f in dataclasses.fields(MythosConfig)}
    if name not in fields:
        raise ValueError(f"model.{name}: not a MythosConfig field")
    return _coerce_scalar(type(fields[name].default), value, f"model.{name}")


def _fail(field: str, rule: str) -> None:
    raise ValueError(f"TrainConfig.{field}: {rule}")
