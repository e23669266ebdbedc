"""MythosConfig: the hyper-parameters of an OpenMythos model, validated at construction.

Every field of ``open_mythos.main.MythosConfig`` (open-mythos 0.5.0) is here with the same
name, meaning and default, so that ``MythosConfig(**dataclasses.asdict(torch_cfg))`` works.
Fields after ``dropout`` are mythos-jax extensions; their defaults keep OpenMythos numerics.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from mythos_jax.modes import (ACTMode, AttentionImpl, AttentionType, ComputeDtype, Injection,
                              LoopRemat, Mode, MoEImpl, Positions)


@dataclasses.dataclass(frozen=True)
class MythosConfig:
    """Architecture of an OpenMythos Recurrent-Depth Transformer.

    Core: ``vocab_size``, ``dim``, ``n_heads``, ``n_kv_heads`` (GQA only), ``max_seq_len``,
    ``max_loop_iters`` (OpenMythos's name for the default loop count T, not a bound: a forward
    may run more loops; also the size of the depth-wise LoRA scale table), ``prelude_layers``,
    ``coda_layers``.
    Attention: ``attn_type`` in {"mla", "gqa"}; MLA uses ``kv_lora_rank``, ``q_lora_rank``,
    ``qk_rope_head_dim``, ``qk_nope_head_dim``, ``v_head_dim``.
    MoE (recurrent block only): ``n_experts`` routed, ``n_shared_experts`` always on (hidden
    ``expert_dim * n_experts_per_tok``), ``n_experts_per_tok`` = top-K, ``expert_dim``.
    Other: ``act_threshold`` (ACT cumulative halting threshold), ``rope_theta`` (which layers
    rotate: ``positions``), ``lora_rank``, ``max_output_tokens`` (unused by the model, kept for
    compatibility), ``dropout``.

    Extensions (not in OpenMythos):
      ``dtype``: compute dtype of matmuls, "float32" (default, parity) or "bfloat16".
        Parameters stay fp32; norms, softmax, RoPE, loop embedding, LTI and ACT run in fp32.
      ``attention_impl``: how MLA attention runs (``kernels/dispatch.py``): "auto" (default;
        tokamax on Hopper/Blackwell GPUs when installed, else Pallas kernels on TPU/GPU, XLA on
        CPU, by the platform of the mesh in force), "xla" (einsums), "pallas" (flash attention
        for training/prefill, latent decode kernel; interpreted on CPU), "tokamax" (its flash
        attention; decode by einsums). Equal up to float rounding; dropout > 0 in training
        uses XLA.
      ``moe_impl``: how tokens reach their experts (``moe/dispatch.py``); all equal
        up to float rounding when no token is dropped: "grouped" (default; rows sorted by
        expert into fixed-size blocks, one batched matmul), "dense" (every expert on every
        token, the reference), "dropless" (sorted rows and grouped matmuls, per platform:
        ``moe/grouped_matmul.py``), "capacity" (at most ``capacity_factor * N*K / E`` rows per
        expert, the rest dropped and counted). Under a mesh with an ``expert`` axis all but
        "dense" run expert-parallel (``moe/expert_parallel.py``).
      ``capacity_factor``: per-expert buffer size of ``moe_impl="capacity"`` relative to a
        perfectly balanced load (> 0; 1.25 by default).
      ``loop_remat``: what backprop keeps per loop iteration (values are unchanged):
        "dots" (default; matmul outputs, elementwise work recomputed), "full" (only the loop
        carry: least memory, one extra forward of the loop), "none" (everything).
    Math variants (each changes the model's output; defaults are OpenMythos's):
      ``act``: "openmythos" (ACT-weighted sum, no remainder flush), "flush" (the unspent mass
        of never-halted positions goes to the last loop, so weights sum to 1), "off" (output
        the last h; the recipe that extrapolates in depth, OpenMythos issue #28).
      ``injection``: "openmythos" (``h = A*h + B*e + Block(norm(h + emb + e))``) or "parcae"
        (``u = A*h + dt*(e @ B.T)``, ``A = exp(-softplus(dt_bias) * exp(A_log))``, B a full
        matrix initialised to identity; ``h = Block(u + emb)``) or "additive"
        (``h = h + e + Block(norm(h + emb + e))``: no decay, no input gain, so nothing bounds
        the state) or "free" (``h = A*h + e @ B.T + Block(norm(h + emb + e))`` with A (D,)
        and B (D, D) learned and unconstrained, A initialised to 1 and B to ``0.1 * I``: rho(A)
        may cross 1, Parcae's unstable baseline). "additive" and "free" are the baselines of
        the stability experiment (E3), never for real runs.
      ``loop_embed_scale``: multiplies the loop-index embedding (1.0: OpenMythos, whose unit
        sin/cos channels dwarf token embeddings of std 0.02 in the normalised block input at
        init; a scale near the embedding std lets looped models learn from scratch, see
        ``experiments/README.md``).
      ``prelude_norm``: RMSNorm on the prelude output before the loop (Parcae).
      ``readout``: a learned (D, D) projection of the loop output before the coda (Parcae C).
      ``positions``: where attention applies RoPE (``rope_theta``): "rope" (every layer,
        OpenMythos), "nope_loop" (prelude and coda only; the recurrent block's attention is
        unrotated, its rope dims act as content dims), "nope" (no layer: causal mask only).
    """

    vocab_size: int = 32000
    dim: int = 2048
    n_heads: int = 16
    n_kv_heads: int = 4
    max_seq_len: int = 4096
    max_loop_iters: int = 16
    prelude_layers: int = 2
    coda_layers: int = 2
    attn_type: AttentionType = AttentionType.MLA
    kv_lora_rank: int = 512
    q_lora_rank: int = 1536
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    n_experts: int = 64
    n_shared_experts: int = 2
    n_experts_per_tok: int = 4
    expert_dim: int = 512
    act_threshold: float = 0.99
    rope_theta: float = 500000.0
    lora_rank: int = 16
    max_output_tokens: int = 4096
    dropout: float = 0.0
    # --- mythos-jax extensions (defaults keep OpenMythos numerics) ---
    dtype: ComputeDtype = ComputeDtype.FLOAT32
    attention_impl: AttentionImpl = AttentionImpl.AUTO
    moe_impl: MoEImpl = MoEImpl.GROUPED
    capacity_factor: float = 1.25
    loop_remat: LoopRemat = LoopRemat.DOTS
    act: ACTMode = ACTMode.OPENMYTHOS
    injection: Injection = Injection.OPENMYTHOS
    prelude_norm: bool = False
    readout: bool = False
    loop_embed_scale: float = 1.0
    positions: Positions = Positions.ROPE

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that breaks a rule; mode names become
        their :mod:`mythos_jax.modes` members."""
        for name, mode in _MODE_FIELDS.items():
            object.__setattr__(self, name, mode.parse(getattr(self, name), f"MythosConfig.{name}"))
        for name in ("vocab_size", "dim", "n_heads", "max_seq_len", "max_loop_iters",
                     "n_experts", "n_experts_per_tok", "expert_dim", "lora_rank",
                     "max_output_tokens"):
            _require_int(self, name, minimum=1)
        for name in ("prelude_layers", "coda_layers", "n_shared_experts"):
            _require_int(self, name, minimum=0)
        if self.dim % self.n_heads:
            _fail("dim", f"must be divisible by n_heads={self.n_heads}, got {self.dim}")
        if (self.dim // 8) % 2 or self.dim < 16:
            _fail("dim", f"dim // 8 (the loop-embedding width) must be even and >= 2, "
                         f"got dim={self.dim}")
        if self.attn_type == AttentionType.GQA:
            _require_int(self, "n_kv_heads", minimum=1)
            if self.n_heads % self.n_kv_heads:
                _fail("n_kv_heads", f"n_heads={self.n_heads} must be divisible by "
                                    f"n_kv_heads={self.n_kv_heads} for GQA")
            if (self.dim // self.n_heads) % 2:
                _fail("dim", f"the GQA head dim dim // n_heads = {self.dim // self.n_heads} "
                             "must be even for RoPE")
        else:
            for name in ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim",
                         "qk_nope_head_dim", "v_head_dim"):
                _require_int(self, name, minimum=1)
            if self.qk_rope_head_dim % 2:
                _fail("qk_rope_head_dim", f"must be even for RoPE, got {self.qk_rope_head_dim}")
        if not 1 <= self.n_experts_per_tok <= self.n_experts:
            _fail("n_experts_per_tok", f"must be in [1, n_experts={self.n_experts}], "
                                       f"got {self.n_experts_per_tok}")
        _require_float(self, "act_threshold")
        if not self.act_threshold > 0:
            _fail("act_threshold", f"must be > 0, got {self.act_threshold}")
        _require_float(self, "rope_theta")
        if not self.rope_theta > 1:
            _fail("rope_theta", f"must be > 1, got {self.rope_theta}")
        _require_float(self, "dropout")
        if not 0.0 <= self.dropout < 1.0:
            _fail("dropout", f"must be in [0, 1), got {self.dropout}")
        _require_float(self, "capacity_factor")
        if not self.capacity_factor > 0:
            _fail("capacity_factor", f"must be > 0, got {self.capacity_factor}")
        _require_float(self, "loop_embed_scale")
        if not 0.0 <= self.loop_embed_scale < float("inf"):
            _fail("loop_embed_scale", f"must be finite and >= 0, got {self.loop_embed_scale}")
        for name in ("prelude_norm", "readout"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, f"must be a bool, got {getattr(self, name)!r}")

    # ------------------------------------------------------------------ derived sizes
    @property
    def has_openmythos_weights(self) -> bool:
        """True when the parameters and their math are OpenMythos's (convertible to and from
        PyTorch with the same logits)."""
        return (self.injection == Injection.OPENMYTHOS and not self.prelude_norm
                and not self.readout and self.loop_embed_scale == 1.0
                and self.positions == Positions.ROPE)

    @property
    def rope_dim(self) -> int:
        """Rotated dims per head: qk_rope_head_dim (MLA) or the head dim (GQA)."""
        return self.qk_rope_head_dim if self.attn_type == AttentionType.MLA else self.head_dim

    @property
    def head_dim(self) -> int:
        """GQA head dim (dim // n_heads)."""
        return self.dim // self.n_heads

    @property
    def loop_dim(self) -> int:
        """Channels that receive the loop-index embedding (OpenMythos: dim // 8)."""
        return self.dim // 8

    @property
    def dense_hidden(self) -> int:
        """Hidden size of the prelude/coda SwiGLU (OpenMythos: dim * 4 // 3)."""
        return self.dim * 4 // 3

    @property
    def shared_hidden(self) -> int:
        """Hidden size of each shared expert (expert_dim * n_experts_per_tok)."""
        return self.expert_dim * self.n_experts_per_tok

    # ------------------------------------------------------------------ (de)serialisation
    def replace(self, **changes: Any) -> "MythosConfig":
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (modes as their names), for JSON and YAML."""
        return {name: str(value) if isinstance(value, Mode) else value
                for name, value in dataclasses.asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> "MythosConfig":
        """Build from a dict; unknown keys raise ``ValueError`` listing them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"MythosConfig: unknown field(s) {unknown}")
        return cls(**fields)

    @classmethod
    def from_json(cls, text: str) -> "MythosConfig":
        return cls.from_dict(json.loads(text))


def parse_override(text: str) -> tuple[str, Any]:
    """``"FIELD=VALUE"`` -> (field, value typed like that MythosConfig field); ValueError naming
    the problem (no '=', unknown field, a value of the wrong type)."""
    if "=" not in text:
        raise ValueError(f"expected FIELD=VALUE, got {text!r}")
    name, raw = (part.strip() for part in text.split("=", 1))
    fields = {f.name: f for f in dataclasses.fields(MythosConfig)}
    if name not in fields:
        raise ValueError(f"unknown MythosConfig field {name!r}")
    kind = type(fields[name].default)
    if issubclass(kind, Mode):
        return name, kind.parse(raw, f"MythosConfig.{name}")
    if kind is bool:
        if raw.lower() not in ("true", "false"):
            raise ValueError(f"MythosConfig.{name}: expected true or false, got {raw!r}")
        return name, raw.lower() == "true"
    try:
        return name, kind(raw)
    except ValueError:
        raise ValueError(f"MythosConfig.{name}: expected a {kind.__name__}, got {raw!r}") from None


_MODE_FIELDS = {"attn_type": AttentionType, "dtype": ComputeDtype, "attention_impl": AttentionImpl,
                "moe_impl": MoEImpl, "loop_remat": LoopRemat, "act": ACTMode,
                "injection": Injection, "positions": Positions}


def _fail(field: str, rule: str) -> None:
    raise ValueError(f"MythosConfig.{field}: {rule}")


def _require_int(cfg: MythosConfig, name: str, minimum: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, f"must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        _fail(name, f"must be >= {minimum}, got {value}")


def _require_float(cfg: MythosConfig, name: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(name, f"must be a number, got {type(value).__name__} {value!r}")
