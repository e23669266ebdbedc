"""TrainConfig: everything ``mythos-jax train`` needs, as nested frozen dataclasses.

A config comes from a preset name (``PRESETS``) or a YAML/JSON file, then ``section.field=value``
overrides, e.g. ``optim.lr=1e-3 loops.mean=6 model.dim=128 data.source=khop``::

    steps: 2000                     # optimizer updates
    seed: 0                         # parameters, loop draws and dropout (data has data.seed)
    mesh: data=-1                   # device mesh spec (mythos_jax.parallel.mesh)
    rules: default                  # logical-axis -> mesh-axis rules preset
    model: {variant: tiny_mla, dim: 128}     # a variant + MythosConfig field overrides
    data: {source: stdlib, seq_len: 128, batch_size: 16}   # train/data_config.py, per source
    loops: {schedule: poisson, mean: 4, max_loops: 8, backprop_depth: null}   # loop_config.py
    optim: {lr: 3e-3, warmup_steps: 100, ...}
    checkpoint: {every: 200, keep: 3}
    log: {every: 10}
    eval: {every: 500, batches: 8, loops: [1, 2, 4, 8]}

The ``data`` and ``loops`` sections are tagged choices (``config_parse.Choice``): ``source`` and
``schedule`` pick the section's class, and an override that changes them drops the fields the
new kind lacks. The model's ``vocab_size`` follows the data's tokenizer unless set explicitly,
and its ``max_seq_len`` must cover ``data.seq_len``. Every field is documented on its dataclass.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from mythos_jax import variants
from mythos_jax.config import MythosConfig
from mythos_jax.parallel.rules import RULE_PRESETS
from mythos_jax.train.config_file import load_yaml, read_mapping
from mythos_jax.train.config_parse import build, coerce_scalar, fail, merge, to_plain
from mythos_jax.train.data import vocab_size
from mythos_jax.train.data_config import DataConfig, StdlibData
from mythos_jax.train.loop_config import LoopsConfig, PoissonLoops


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
            fail("optim.lr", f"must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            fail("optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            fail("optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_accum < 1:
            fail("optim.grad_accum", f"must be >= 1, got {self.grad_accum}")
        if self.max_nonfinite < 1:
            fail("optim.max_nonfinite", f"must be >= 1, got {self.max_nonfinite}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints in ``<workdir>/checkpoints``: every ``every`` steps and at the end,
    the last ``keep`` kept, written asynchronously (``async_save``)."""
    every: int = 200
    keep: int = 3
    async_save: bool = True

    def validate(self) -> None:
        if self.every < 1:
            fail("checkpoint.every", f"must be >= 1, got {self.every}")
        if self.keep < 1:
            fail("checkpoint.keep", f"must be >= 1, got {self.keep}")


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
            fail("log.every", f"must be >= 1, got {self.every}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation every ``every`` steps (0: only at the end) on ``batches`` batches of each
    eval split, at each test-time loop count in ``loops`` (the depth curve)."""
    every: int = 0
    batches: int = 4
    loops: tuple[int, ...] = (1, 2, 4, 8)

    def validate(self) -> None:
        if self.every < 0:
            fail("eval.every", f"must be >= 0, got {self.every}")
        if self.batches < 1:
            fail("eval.batches", f"must be >= 1, got {self.batches}")
        if not self.loops or min(self.loops) < 1:
            fail("eval.loops", f"must be loop counts >= 1, got {self.loops}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole training run; see the module docstring for the file format."""
    steps: int = 1000
    seed: int = 0
    mesh: str = "data=-1"
    rules: str = "default"
    model: dict = dataclasses.field(default_factory=lambda: {"variant": "tiny_mla"})
    data: DataConfig = dataclasses.field(default_factory=StdlibData)
    loops: LoopsConfig = dataclasses.field(default_factory=PoissonLoops)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.steps < 1:
            fail("steps", f"must be >= 1, got {self.steps}")
        if self.rules not in RULE_PRESETS:
            fail("rules", f"must be one of {sorted(RULE_PRESETS)}, got {self.rules!r}")
        for section in (self.loops, self.optim, self.checkpoint, self.log, self.eval):
            section.validate()      # data validates itself when built
        if self.data.batch_size % self.optim.grad_accum:
            fail("optim.grad_accum", f"must divide data.batch_size={self.data.batch_size}, "
                                      f"got {self.optim.grad_accum}")
        self.model_config()     # the model section must build

    def model_config(self) -> MythosConfig:
        """The MythosConfig: ``model.variant`` with the other ``model.*`` fields applied;
        ``vocab_size`` defaults to the data's (read from its tokenizer or shards only then)."""
        fields = dict(self.model)
        name = fields.pop("variant", "tiny_mla")
        try:
            base = variants.get_variant(name)
        except ValueError as err:
            raise ValueError(f"model.variant: {err}") from None
        if "vocab_size" not in fields:
            fields["vocab_size"] = vocab_size(self.data)
        cfg = base.replace(**{k: _coerce_model_field(k, v) for k, v in fields.items()})
        if cfg.max_seq_len < self.data.seq_len:
            fail("model.max_seq_len", f"{cfg.max_seq_len} is shorter than data.seq_len="
                                       f"{self.data.seq_len}")
        return cfg

    def with_data_vocab(self) -> "TrainConfig":
        """This config with ``model.vocab_size`` written out (the data's unless given), so
        that what a run stores describes its model without the data; ``ValueError`` if the
        given size is smaller than the data's vocabulary."""
        data_vocab = vocab_size(self.data)
        size = self.model.get("vocab_size", data_vocab)
        if int(size) < data_vocab:
            fail("model.vocab_size", f"{size} is smaller than the data's vocabulary "
                                      f"({data_vocab})")
        return dataclasses.replace(self, model={**self.model, "vocab_size": size})

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> "TrainConfig":
        return build(cls, fields)


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
    # `make train-lm`: ~10 minutes on 2 CPU cores, byte-level LM on the stdlib sources.
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
    # E1's looped_random arm (``make train`` runs E1's fixed-depth twin): k-hop composition
    # over a knowledge graph, trained on <= 4 hops with Poisson(6) loops; the depth curve shows
    # more test-time loops answering more hops (~4 min on 2 CPU cores).
    # tests/test_experiments.py keeps it equal to depth_extrapolation.py's arm.
    "khop": {
        "steps": 2000,
        "model": {"variant": "tiny_mla", "act": "off", "n_experts": 1, "n_experts_per_tok": 1,
                  "expert_dim": 128, "max_seq_len": 16, "loop_embed_scale": 0.02},
        "data": {"source": "khop_graph", "seq_len": 16, "batch_size": 64, "khop_entities": 32,
                 "khop_eval_hops": list(range(1, 13)), "khop_supervision": "every_hop",
                 "khop_graph_seed": 0},
        "loops": {"schedule": "poisson", "mean": 6.0, "max_loops": 12, "backprop_depth": 6},
        "optim": {"warmup_steps": 500},
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
    return TrainConfig.from_dict(train_config_fields(source, overrides))


def train_config_fields(source: str | None, overrides: list[str] = ()) -> dict[str, Any]:
    """The fields ``load_train_config`` builds its TrainConfig from (nothing validated yet:
    building one reads the data's vocabulary)."""
    if source is None:
        fields: dict[str, Any] = {}
    elif source in PRESETS:
        fields = json.loads(json.dumps(PRESETS[source]))
    elif os.path.exists(source):
        fields = read_mapping(source)
    else:
        raise ValueError(f"config {source!r} is neither a preset {sorted(PRESETS)} nor a file")
    changes: dict[str, Any] = {}
    for text in overrides:
        key, sep, raw = text.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {text!r}: expected section.field=value")
        *sections, name = key.strip().split(".")
        target = changes
        for section in sections:
            target = target.setdefault(section, {})
            if not isinstance(target, dict):
                raise ValueError(f"override {text!r}: {section!r} is not a section")
        target[name] = _parse_scalar(raw)
    return merge(TrainConfig, fields, changes)


def _parse_scalar(raw: str) -> Any:
    import yaml
    try:
        return load_yaml(raw)
    except yaml.YAMLError:
        return raw


def _coerce_model_field(name: str, value: Any) -> Any:
    fields = {f.name: f for f in dataclasses.fields(MythosConfig)}
    if name not in fields:
        raise ValueError(f"model.{name}: not a MythosConfig field")
    return coerce_scalar(type(fields[name].default), value, f"model.{name}")
