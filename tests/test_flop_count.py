"""mythos_jax.flops (mythos_jax/flop_count.py): forward and training FLOPs per token,
loop-aware, active experts only, checked against a hand count of ``variants.tiny_mla()``."""

from __future__ import annotations

import jax
import pytest
from flax import nnx

import mythos_jax
from mythos_jax import flop_count, variants

# tiny_mla: vocab 256, D=64, H=4, q_lora=32, kv_lora=16, nope=8, rope=8, v=16,
# E=4 routed experts, K=2 per token, expert_dim F=32, 1 shared expert (hidden F*K = 64),
# lora_rank 4, 1 prelude + 1 coda layer, max_loop_iters 4. Sequence length T=16.
T = 16

# One MLA layer, multiply-adds (MACs) per token:
PROJ_MACS = (64 * 32            # q_down        D -> q_lora           = 2048
             + 32 * 4 * 8       # q_up_nope     q_lora -> H*nope      = 1024
             + 32 * 4 * 8       # q_up_rope     q_lora -> H*rope      = 1024
             + 64 * (16 + 8)    # kv_down       D -> kv_lora + rope   = 1536
             + 16 * 4 * (8 + 16)  # kv_up       kv_lora -> H*(nope+v) = 1536
             + 4 * 16 * 64)     # wo            H*v -> D              = 4096
SCORES_MACS = 4 * T * (8 + 8)   # q.k over all T keys, per head, dim nope+rope = 1024
PV_MACS = 4 * T * 16            # probabilities @ V over all T keys, dim v   = 1024
ATTN = 2 * (PROJ_MACS + SCORES_MACS + PV_MACS)             # FLOPs = 2 x MACs = 26624
DENSE_FFN = 2 * 3 * 64 * 85     # prelude/coda SwiGLU, hidden 64*4//3 = 85   = 32640
ROUTER = 2 * 64 * 4             # D -> E logits (all E experts are scored)   = 512
ROUTED = 2 * (2 * 3 * 64 * 32)  # K=2 chosen experts, SwiGLU D<->F each      = 24576
SHARED = 1 * 2 * 3 * 64 * 64    # 1 shared expert, SwiGLU D<->F*K            = 24576
LORA = 2 * (64 * 4 + 4 * 64)    # depth LoRA: down D->r, B r->D              = 1024
HALT = 2 * 64 * 1               # ACT halting head D->1                      = 128
HEAD = 2 * 64 * 256             # tied output head D->vocab                  = 32768
PER_LOOP = ATTN + ROUTER + ROUTED + SHARED + LORA + HALT                     # 77440
PRELUDE = CODA = 1 * (ATTN + DENSE_FFN)                                      # 59264


def test_hand_constants():
    # the arithmetic above, spelled out once so a typo in it cannot hide
    assert PROJ_MACS == 11264 and ATTN == 26624 and DENSE_FFN == 32640
    assert PER_LOOP == 77440 and PRELUDE == 59264 and HEAD == 32768


@pytest.mark.parametrize("given", [1, 3, None])
def test_forward_by_hand(given):
    cfg = variants.tiny_mla()
    loops = 4 if given is None else given              # default: cfg.max_loop_iters = 4
    f = mythos_jax.flops(cfg, T, loops=given)
    assert f["loops"] == loops and f["seq_len"] == T
    assert f["forward"] == PRELUDE + loops * PER_LOOP + CODA + HEAD
    b = f["forward_breakdown"]
    assert b["attention"] == {"proj": 2 * PROJ_MACS, "scores": 2 * SCORES_MACS, "pv": 2 * PV_MACS}
    assert b["moe"] == {"router": ROUTER, "routed": ROUTED, "shared": SHARED}
    assert (b["dense_ffn"], b["lora"], b["halt"], b["head"]) == (DENSE_FFN, LORA, HALT, HEAD)
    assert b["injection"] == 0 and b["readout"] == 0   # LTI injection is elementwise
    assert f["recurrent_per_loop"] == b["recurrent_per_loop"] == PER_LOOP
    assert b["total"] == f["forward"]
    if given is None:
        assert f["forward"] == 2 * 59264 + 4 * 77440 + 32768 == 461056


def test_train_full_backprop_is_three_forwards():
    cfg = variants.tiny_mla()
    f = mythos_jax.flops(cfg, T, 4)
    assert f["grad_loops"] == 4 and f["no_grad_loops"] == 0 and f["backprop_depth"] is None
    assert f["train"] == 3 * f["forward"] == 3 * 461056
    assert flop_count.train_flops_per_token(cfg, T, 4) == f["train"]


def test_train_with_truncated_backprop():
    cfg = variants.tiny_mla()
    # 6 loops, gradient through the last 2: prelude, coda, head and 2 loops at 3x (forward +
    # backward), the first 4 loops forward only (stop-gradient copy of the block) at 1x.
    f = mythos_jax.flops(cfg, T, loops=6, backprop_depth=2)
    assert f["grad_loops"] == 2 and f["no_grad_loops"] == 4
    assert f["forward"] == PRELUDE + 6 * PER_LOOP + CODA + HEAD
    assert f["train"] == 3 * (PRELUDE + 2 * PER_LOOP + CODA + HEAD) + 4 * PER_LOOP
    assert f["train"] == 3 * (59264 + 2 * 77440 + 59264 + 32768) + 4 * 77440 == 1228288
    assert f["train"] < 3 * f["forward"]
    assert flop_count.train_flops_per_token(cfg, T, 6, backprop_depth=2) == f["train"]
    # k >= n is full backprop (run_training makes it exactly that)
    for k in (6, 9):
        g = mythos_jax.flops(cfg, T, 6, backprop_depth=k)
        assert g["grad_loops"] == 6 and g["no_grad_loops"] == 0
        assert g["train"] == 3 * g["forward"]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="backprop_depth"):
            mythos_jax.flops(cfg, T, 6, backprop_depth=bad)


def test_routed_experts_scale_with_top_k_not_with_expert_count():
    base = variants.tiny_mla()
    routed = lambda **kw: mythos_jax.flops(base.replace(**kw), T)["forward_breakdown"]["moe"]
    assert routed()["routed"] == ROUTED
    # 4x more experts, same top-K: routed work unchanged (only the router's E logits grow)
    many = routed(n_experts=16)
    assert many["routed"] == ROUTED and many["router"] == 4 * ROUTER
    # top-K 1 / 4: routed work proportional to K
    assert routed(n_experts_per_tok=1)["routed"] == ROUTED // 2
    assert routed(n_experts_per_tok=4)["routed"] == 2 * ROUTED
    # and the whole per-loop figure moves by exactly the routed difference when E changes
    per_loop = lambda **kw: mythos_jax.flops(base.replace(**kw), T)["recurrent_per_loop"]
    assert per_loop(n_experts=16) - per_loop() == 3 * ROUTER


@pytest.mark.parametrize("injection", ["parcae", "free"])
def test_input_matrix_injection_and_readout_matmuls_are_counted(injection):
    cfg = variants.tiny_mla(injection=injection, readout=True)
    f = mythos_jax.flops(cfg, T, 3)
    b = f["forward_breakdown"]
    assert b["injection"] == 2 * 64 * 64 and b["readout"] == 2 * 64 * 64   # e @ B.T, readout
    assert f["recurrent_per_loop"] == PER_LOOP + 2 * 64 * 64
    assert f["forward"] == PRELUDE + 3 * (PER_LOOP + 8192) + 8192 + CODA + HEAD


def test_projection_counts_match_the_model_weights():
    """Per token, a matmul against a kernel costs one MAC per kernel entry: the hand count of
    every weight-matmul must equal the weight sizes of the built model (top-K of E experts)."""
    cfg = variants.tiny_mla()
    model = mythos_jax.OpenMythos(cfg, rngs=nnx.Rngs(0))
    size = lambda module: sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
    rec = model.recurrent
    attn = rec.block.attn
    attn_kernels = sum(getattr(attn, n).kernel[...].size
                       for n in ("q_down", "q_up_nope", "q_up_rope", "kv_down", "kv_up", "wo"))
    assert attn_kernels == PROJ_MACS
    moe = rec.block.ffn
    per_expert = (moe.gate[...].size + moe.up[...].size + moe.down[...].size) // cfg.n_experts
    assert 2 * cfg.n_experts_per_tok * per_expert == ROUTED
    assert 2 * moe.router.kernel[...].size == ROUTER
    assert 2 * sum(size(s) for s in moe.shared_experts) == SHARED
    assert 2 * size(model.prelude[0].ffn) == DENSE_FFN
    assert 2 * (rec.lora.down.kernel[...].size + rec.lora.B[...].size) == LORA
    assert 2 * rec.act.halt.kernel[...].size == HALT
    assert 2 * model.embed[...].size == HEAD
