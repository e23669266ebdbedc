"""The benchmark model presets: configs (``PRESETS``) and their batch shapes, with ACT's early
exit out of reach so that every implementation runs every loop.

    cfg = benchmark_config("small", {"moe_impl": "dense"})    # MythosConfig, max_seq_len 128
"""

from __future__ import annotations

from typing import Any

from mythos_jax.config import MythosConfig

# An ACT threshold no position can reach: both implementations run every loop iteration.
NO_HALT_THRESHOLD = 1e9

#: Model presets. "default" is the config of the issue (dim 256, 16 experts, top-2, 8 loops,
#: vocab 4096); "small" is a narrow, many-expert model where PyTorch's per-expert Python loop
#: dominates; "tiny" is for tests (seconds). ``max_seq_len`` is set to the benchmark's seq_len
#: unless given.
PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(
        vocab_size=4096, dim=256, n_heads=8, n_kv_heads=4, max_loop_iters=8,
        prelude_layers=1, coda_layers=1, attn_type="mla",
        q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_experts=16, n_shared_experts=1, n_experts_per_tok=2, expert_dim=128,
        lora_rank=8, rope_theta=500000.0, dropout=0.0),
    "small": dict(
        vocab_size=4096, dim=64, n_heads=4, n_kv_heads=2, max_loop_iters=8,
        prelude_layers=1, coda_layers=1, attn_type="mla",
        q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_experts=32, n_shared_experts=1, n_experts_per_tok=2, expert_dim=32,
        lora_rank=8, rope_theta=500000.0, dropout=0.0),
    "tiny": dict(
        vocab_size=128, dim=32, n_heads=2, n_kv_heads=1, max_loop_iters=2,
        prelude_layers=1, coda_layers=1, attn_type="mla",
        q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=8, n_experts=4, n_shared_experts=1, n_experts_per_tok=2, expert_dim=16,
        lora_rank=4, rope_theta=500000.0, dropout=0.0),
}
#: Batch shape and loop count that go with each preset (run_benchmark's defaults).
PRESET_SHAPES: dict[str, dict[str, int]] = {
    "default": dict(batch=8, seq_len=128, n_loops=8),
    "small": dict(batch=8, seq_len=128, n_loops=8),
    "tiny": dict(batch=2, seq_len=16, n_loops=2),
}


def benchmark_config(preset: str = "default", cfg_overrides: dict | None = None, *,
                     seq_len: int | None = None) -> MythosConfig:
    """The MythosConfig of ``preset`` with ``cfg_overrides`` applied.

    ``act_threshold`` is NO_HALT_THRESHOLD and ``max_seq_len`` is ``seq_len`` unless
    ``cfg_overrides`` sets them.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    fields = dict(PRESETS[preset], act_threshold=NO_HALT_THRESHOLD)
    fields["max_seq_len"] = seq_len if seq_len is not None else PRESET_SHAPES[preset]["seq_len"]
    fields.update(cfg_overrides or {})
    return MythosConfig.from_dict(fields)
