"""Analytic FLOP counts of OpenMythos models, per token: loop-aware, active experts only.

    from mythos_jax import flops                  # == mythos_jax.flop_count.flops
    flops(cfg, seq_len=128, loops=8)              # {"forward": ..., "train": ..., ...}
    flops(cfg, 128, loops=16, backprop_depth=4)   # truncated backprop: 12 loops forward only

    from mythos_jax.flop_count import forward_flops_per_token
    forward_flops_per_token(cfg, seq_len=128, loops=8)["total"]

FLOPs are 2 x multiply-adds of the matmuls a forward needs; elementwise work is not counted.
MoE layers count only the experts a token is routed to (top-K) plus the shared experts and
the router, as MaxText counts MoE: padding or dense dispatch is overhead, not useful work.
Benchmarks divide achieved FLOP/s by a measured peak with these figures (MFU-style).
(The module is ``flop_count``, not ``flops``, so that the package-level function
``mythos_jax.flops`` does not shadow it.)
"""

from __future__ import annotations

import math
from typing import Any

from mythos_jax.config import MythosConfig
from mythos_jax.modes import AttentionType

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
    if cfg.attn_type == AttentionType.MLA:
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
                            loops: int | None = None) -> dict[str, Any]:
    """Analytic useful FLOPs (2 x multiply-adds of every needed matmul) of one forward, per token.

    Counted:
      * prelude and coda layers (``prelude_layers + coda_layers`` of them): attention (see
        :func:`attention_flops_per_token`: projections, full T x T scores and PV) and the dense
        SwiGLU (hidden ``dim * 4 // 3``);
      * the recurrent block, times ``loops`` (default ``cfg.max_loop_iters``): attention,
        the MoE (router + top-K routed experts + shared experts, :func:`moe_flops_per_token`),
        the depth-wise LoRA (down D x r and B r x D), the ACT halting head (D x 1), and
        with ``cfg.injection`` "parcae" or "free" the injection's full B matrix (e @ B.T, D x D);
      * with ``cfg.readout`` the (D x D) readout projection before the coda, once;
      * the tied output head (D x vocab).
    Not counted: the embedding lookup (a gather), norms, RoPE, softmax, the loop-index
    embedding, the LTI injection, ACT bookkeeping, residual adds (all elementwise, O(D)).

    Returns a dict with the per-part figures and ``"total"``. A training step (forward +
    backward) is counted as ``3 * total`` (the backward of a matmul costs two matmuls); with
    truncated backprop see :func:`flops`.
    """
    loops = cfg.max_loop_iters if loops is None else loops
    D = cfg.dim
    attn = attention_flops_per_token(cfg, seq_len)
    attn_total = sum(attn.values())
    dense_ffn = swiglu_flops_per_token(D, cfg.dense_hidden)
    moe = moe_flops_per_token(cfg)
    lora = 2 * (D * cfg.lora_rank + cfg.lora_rank * D)
    halt = 2 * D
    injection = 2 * D * D if cfg.injection.input_matrix else 0   # LTI: elementwise only
    per_loop = attn_total + sum(moe.values()) + lora + halt + injection
    prelude = cfg.prelude_layers * (attn_total + dense_ffn)
    coda = cfg.coda_layers * (attn_total + dense_ffn)
    readout = 2 * D * D if cfg.readout else 0
    head = 2 * D * cfg.vocab_size
    recurrent = loops * per_loop
    return {
        "attention": attn, "dense_ffn": dense_ffn, "moe": moe, "lora": lora, "halt": halt,
        "injection": injection, "recurrent_per_loop": per_loop, "loops": loops,
        "seq_len": seq_len, "prelude": prelude, "recurrent": recurrent, "readout": readout,
        "coda": coda, "head": head,
        "total": prelude + recurrent + readout + coda + head,
    }


def train_flops_per_token(cfg: MythosConfig, seq_len: int, loops: float | None = None,
                          backprop_depth: int | None = None) -> float:
    """Forward + backward FLOPs per token; see :func:`flops` (``"train"``). Without
    ``backprop_depth`` this is 3 x the forward (the usual convention; optimizer not counted).
    A fractional ``loops`` (a step's mean loop count) interpolates linearly between the
    neighbouring whole counts (the lower one at least 1)."""
    if loops is None or isinstance(loops, int):
        return flops(cfg, seq_len, loops, backprop_depth)["train"]
    return flops_at_mean_loops(cfg, seq_len, loops, backprop_depth)["train"]


def flops_at_mean_loops(cfg: MythosConfig, seq_len: int, loops: float,
                        backprop_depth: int | None = None) -> dict[str, float]:
    """``{"forward", "train"}`` FLOPs per token at a fractional (mean) loop count: linear
    between the neighbouring whole counts (the lower one at least 1), which is exact since
    both are linear in the loops."""
    low = max(1, math.floor(loops))
    at_low, at_high = (flops(cfg, seq_len, n, backprop_depth) for n in (low, low + 1))
    return {kind: at_low[kind] + (loops - low) * (at_high[kind] - at_low[kind])
            for kind in ("forward", "train")}


def flops(cfg: MythosConfig, seq_len: int, loops: int | None = None,
          backprop_depth: int | None = None) -> dict[str, Any]:
    """Forward and training FLOPs per token of ``cfg`` at sequence length ``seq_len``, running
    ``loops`` recurrent iterations (default ``cfg.max_loop_iters``), active experts only.

    ``"forward"``: :func:`forward_flops_per_token`'s total (every loop runs; ACT halting is
    bookkeeping, it does not skip work).
    ``"train"``: forward + backward, the backward of a matmul costing two matmuls, so 3x the
    forward for everything that takes a gradient: prelude, coda, readout, head and the
    ``grad_loops`` recurrent iterations. With ``backprop_depth=k < loops`` (truncated
    backprop, :func:`mythos_jax.loops.drivers.run_training`) the first ``loops - k``
    iterations run forward only, on a stop-gradient copy of the block, and count 1x.
    Rematerialisation (``cfg.loop_remat``) re-runs forward work and is not counted (as MFU
    does not).

    Returns ``{"forward", "train", "loops", "seq_len", "backprop_depth", "grad_loops",
    "no_grad_loops", "recurrent_per_loop", "forward_breakdown"}``, the last being
    :func:`forward_flops_per_token`'s dict.
    """
    fwd = forward_flops_per_token(cfg, seq_len, loops)
    n = fwd["loops"]
    if backprop_depth is not None and (isinstance(backprop_depth, bool)
                                       or not isinstance(backprop_depth, int)
                                       or backprop_depth < 1):
        raise ValueError(f"backprop_depth must be an int >= 1, got {backprop_depth!r}")
    grad_loops = n if backprop_depth is None else min(n, backprop_depth)
    no_grad_loops = n - grad_loops
    per_loop = fwd["recurrent_per_loop"]
    with_grad = (fwd["prelude"] + grad_loops * per_loop + fwd["readout"] + fwd["coda"]
                 + fwd["head"])
    return {
        "forward": fwd["total"],
        "train": 3 * with_grad + no_grad_loops * per_loop,
        "loops": n, "seq_len": seq_len, "backprop_depth": backprop_depth,
        "grad_loops": grad_loops, "no_grad_loops": no_grad_loops,
        "recurrent_per_loop": per_loop, "forward_breakdown": fwd,
    }
