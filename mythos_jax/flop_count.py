"""Analytic FLOP counts of OpenMythos models, per token: loop-aware, active experts only.

    from mythos_jax.flops import forward_flops_per_token, train_flops_per_token
    forward_flops_per_token(cfg, seq_len=128, n_loops=8)["total"]

FLOPs are 2 x multiply-adds of the matmuls a forward needs; elementwise work is not counted.
Benchmarks divide achieved FLOP/s by a measured peak with these figures (MFU-style).
"""

from __future__ import annotations

from typing import Any

from mythos_jax.config import MythosConfig

def attention_flops_per_token(cfg: MythosConfig, seq_len: int) -> dict[str, int]:
    """FLOPs (2 x multiply-adds) of one attention layer for one query token.

    ``proj``: the projections. MLA: q_down (D x q_lora), q_up_nope (q_lora x H*nope), q_up_rope
    (q_lora x H*rope), kv_down (D x (kv_lora + rope)), kv_up (kv_lora x H*(nope + v)),
    wo (H*v x D). GQA: wq, wk, wv, wo.
    ``scores``: q.k over ALL ``seq_len`` keys (the full T x T score matrix, causal positions
    included, since both implementations compute it in full and then mask), H * T * (nope +
    rope) for MLA, H * T * head_dim for GQA.
    ``pv``: probabilities times values over all T keys: H * T * v (MLA), H * T * head_dim (GQA).
    Not counted: norms, RoPE, softmax, masking (elementwise).
    """
    D, H, T = cfg.dim, cfg.n_heads, seq_len
    if cfg.attn_type == "mla":
        nope, rope, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        macs_proj = (D * cfg.q_lora_rank + cfg.q_lora_rank * H * nope
                     + cfg.q_lora_rank * H * rope + D * (cfg.kv_lora_rank + rope)
                     + cfg.kv_lora_rank * H * (nope + v) + H * v * D)
        macs_scores = H * T * (nope + rope)
        macs_pv = H * T * v
    else:
        hd, KV = cfg.head_dim, cfg.n_kv_heads
        macs_proj = D * H * hd + 2 * D * KV * hd + H * hd * D
        macs_scores = H * T * hd
        macs_pv = H * T * hd
    return {"proj": 2 * macs_proj, "scores": 2 * macs_scores, "pv": 2 * macs_pv}


def swiglu_flops_per_token(dim: int, hidden: int) -> int:
    """gate, up (dim x hidden) and down (hidden x dim): 2 * 3 * dim * hidden FLOPs."""
    return 2 * 3 * dim * hidden


def moe_flops_per_token(cfg: MythosConfig) -> dict[str, int]:
    """Useful FLOPs of the MoE for one token: ``router`` (D x E), ``routed`` (only the top-K
    chosen experts, each a SwiGLU of hidden ``expert_dim``), ``shared`` (every shared expert,
    hidden ``expert_dim * K``). Padding or dense dispatch that an implementation may add is
    deliberately not counted: it is overhead, not useful work."""
    D, K = cfg.dim, cfg.n_experts_per_tok
    return {"router": 2 * D * cfg.n_experts,
            "routed": K * swiglu_flops_per_token(D, cfg.expert_dim),
            "shared": cfg.n_shared_experts * swiglu_flops_per_token(D, cfg.shared_hidden)}


def forward_flops_per_token(cfg: MythosConfig, seq_len: int,
                            n_loops: int | None = None) -> dict[str, Any]:
    """Analytic useful FLOPs (2 x multiply-adds of every needed matmul) of one forward, per token.

    Counted:
      * prelude and coda layers (``prelude_layers + coda_layers`` of them): attention (see
        :func:`attention_flops_per_token`: projections, full T x T scores and PV) and the dense
        SwiGLU (hidden ``dim * 4 // 3``);
      * the recurrent block, times ``n_loops`` (default ``cfg.max_loop_iters``): attention,
        the MoE (router + top-K routed experts + shared experts, :func:`moe_flops_per_token`),
        the depth-wise LoRA (down D x r and B r x D), the ACT halting head (D x 1);
      * the tied output head (D x vocab).
    Not counted: the embedding lookup (a gather), norms, RoPE, softmax, the loop-index
    embedding, the LTI injection, ACT bookkeeping, residual adds (all elementwise, O(D)).

    Returns a dict with the per-part figures and ``"total"``. A training step (forward +
    backward) is counted as ``3 * total`` (the backward of a matmul costs two matmuls).
    """
    n_loops = cfg.max_loop_iters if n_loops is None else n_loops
    D = cfg.dim
    attn = attention_flops_per_token(cfg, seq_len)
    attn_total = sum(attn.values())
    dense_ffn = swiglu_flops_per_token(D, cfg.dense_hidden)
    moe = moe_flops_per_token(cfg)
    lora = 2 * (D * cfg.lora_rank + cfg.lora_rank * D)
    halt = 2 * D
    per_loop = attn_total + sum(moe.values()) + lora + halt
    prelude = cfg.prelude_layers * (attn_total + dense_ffn)
    coda = cfg.coda_layers * (attn_total + dense_ffn)
    head = 2 * D * cfg.vocab_size
    recurrent = n_loops * per_loop
    return {
        "attention": attn, "dense_ffn": dense_ffn, "moe": moe, "lora": lora, "halt": halt,
        "recurrent_per_loop": per_loop, "n_loops": n_loops, "seq_len": seq_len,
        "prelude": prelude, "recurrent": recurrent, "coda": coda, "head": head,
        "total": prelude + recurrent + coda + head,
    }


def train_flops_per_token(cfg: MythosConfig, seq_len: int, n_loops: int | None = None) -> int:
    """Forward + backward = 3 x the forward FLOPs (the usual convention; optimizer not counted)."""
    return 3 * forward_flops_per_token(cfg, seq_len, n_loops)["total"]
