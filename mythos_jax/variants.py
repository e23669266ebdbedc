"""Named configurations: OpenMythos's seven variants (exactly its values) and tiny presets.

``mythos_1b() ... mythos_1t()`` return the same configs as ``open_mythos.variants``.
``tiny_mla()`` / ``tiny_gqa()`` are small enough to run and compile in about a second on a
CPU; tests and demos use them.
"""

from __future__ import annotations

from typing import Callable

from mythos_jax.config import MythosConfig


def _variant(vocab, dim, heads, kv_heads, seq, loops, layers, q_lora, kv_lora, nope, rope, v,
             experts, shared, topk, expert_dim, lora, theta, max_out=4096) -> MythosConfig:
    return MythosConfig(
        vocab_size=vocab, dim=dim, n_heads=heads, n_kv_heads=kv_heads, max_seq_len=seq,
        max_loop_iters=loops, prelude_layers=layers, coda_layers=layers, attn_type="mla",
        kv_lora_rank=kv_lora, q_lora_rank=q_lora, qk_rope_head_dim=rope, qk_nope_head_dim=nope,
        v_head_dim=v, n_experts=experts, n_shared_experts=shared, n_experts_per_tok=topk,
        expert_dim=expert_dim, act_threshold=0.99, rope_theta=theta, lora_rank=lora,
        max_output_tokens=max_out)


#            vocab   dim   H  KV  seq        T  pre q_lora kv_lora nope rope v    E  sh K  F      r  theta
def mythos_1b() -> MythosConfig:
    return _variant(32000, 2048, 16, 4, 4096, 16, 2, 512, 256, 64, 32, 64, 64, 2, 4, 2048, 8, 500000.0)


def mythos_3b() -> MythosConfig:
    return _variant(32000, 3072, 24, 6, 4096, 16, 2, 768, 384, 96, 32, 96, 64, 2, 4, 4096, 8, 500000.0)


def mythos_10b() -> MythosConfig:
    return _variant(32000, 4096, 32, 8, 8192, 24, 2, 1024, 512, 128, 64, 128, 128, 2, 4, 5632, 16,
                    500000.0)


def mythos_50b() -> MythosConfig:
    return _variant(32000, 6144, 48, 8, 8192, 32, 3, 1536, 512, 128, 64, 128, 256, 4, 4, 9728, 32,
                    500000.0)


def mythos_100b() -> MythosConfig:
    return _variant(32000, 8192, 64, 8, 1000000, 32, 4, 2048, 512, 128, 64, 128, 256, 4, 8, 13568,
                    64, 1000000.0, max_out=131072)


def mythos_500b() -> MythosConfig:
    return _variant(100000, 12288, 96, 16, 1000000, 48, 4, 3072, 1024, 128, 64, 128, 512, 8, 8,
                    23040, 128, 1000000.0, max_out=131072)


def mythos_1t() -> MythosConfig:
    return _variant(100000, 16384, 128, 16, 1000000, 64, 6, 4096, 1024, 128, 64, 128, 512, 8, 8,
                    34560, 256, 2000000.0, max_out=131072)


def tiny_mla(**overrides) -> MythosConfig:
    """A ~0.1M-parameter MLA model for tests and demos (compiles in about a second)."""
    base = MythosConfig(
        vocab_size=256, dim=64, n_heads=4, n_kv_heads=2, max_seq_len=64, max_loop_iters=4,
        prelude_layers=1, coda_layers=1, attn_type="mla", kv_lora_rank=16, q_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_experts=4, n_shared_experts=1,
        n_experts_per_tok=2, expert_dim=32, lora_rank=4)
    return base.replace(**overrides)


def tiny_gqa(**overrides) -> MythosConfig:
    """The GQA twin of :func:`tiny_mla`."""
    return tiny_mla(attn_type="gqa", **overrides)


VARIANTS: dict[str, Callable[[], MythosConfig]] = {
    f.__name__: f for f in (mythos_1b, mythos_3b, mythos_10b, mythos_50b, mythos_100b,
                            mythos_500b, mythos_1t, tiny_mla, tiny_gqa)
}


def get_variant(name: str) -> MythosConfig:
    """The config called ``name``; unknown names raise ``ValueError`` listing the choices."""
    try:
        return VARIANTS[name]()
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; choose one of {sorted(VARIANTS)}") from None
