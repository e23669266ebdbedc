"""The benchmark against open-mythos (mythos_jax.bench, experiments/bench_vs_torch.py),
run in --quick mode on the "tiny" preset: structure and sanity of the figures, the FLOP count,
and the script's --json output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mythos_jax import flop_count
from mythos_jax.bench import presets, torch_compare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def result():
    return torch_compare.run_benchmark(preset="tiny", quick=True, iters=2, train_iters=2,
                                       matmul_sizes=(256,))


# ---------------------------------------------------------------------------- FLOP count
def test_flops_of_the_tiny_config_by_hand():
    # tiny: D=32, H=2, q_lora=16, kv_lora=8, nope=8, rope=4, v=8, E=4, K=2, F=16, 1 shared,
    # lora_rank=4, vocab=128, 1 prelude + 1 coda layer; T=16, 2 loops.
    cfg = presets.benchmark_config("tiny")
    f = flop_count.forward_flops_per_token(cfg, seq_len=16, loops=2)
    # MLA projections, MACs: q_down 32*16 + q_up_nope 16*2*8 + q_up_rope 16*2*4
    #   + kv_down 32*(8+4) + kv_up 8*2*(8+8) + wo 2*8*32 = 512+256+128+384+256+512 = 2048
    assert f["attention"] == {"proj": 2 * 2048, "scores": 2 * 2 * 16 * 12, "pv": 2 * 2 * 16 * 8}
    # router 32*4, routed 2 experts * 3*32*16, shared 1 * 3*32*(16*2)
    assert f["moe"] == {"router": 2 * 128, "routed": 2 * 3072, "shared": 2 * 3072}
    assert f["dense_ffn"] == 2 * 3 * 32 * 42                       # hidden = 32 * 4 // 3
    assert f["lora"] == 2 * (32 * 4 + 4 * 32) and f["halt"] == 2 * 32
    assert f["head"] == 2 * 32 * 128
    per_loop = (4096 + 768 + 512) + (256 + 6144 + 6144) + 512 + 64
    assert f["recurrent_per_loop"] == per_loop == 18496
    assert f["total"] == 2 * (5376 + 8064) + 2 * per_loop + 8192 == 72064
    assert flop_count.train_flops_per_token(cfg, 16, 2) == 3 * 72064


def test_flops_gqa_attention_component():
    cfg = presets.benchmark_config("tiny", {"attn_type": "gqa"})   # head_dim 16, 1 kv head
    attn = flop_count.attention_flops_per_token(cfg, seq_len=16)
    assert attn["proj"] == 2 * (32 * 32 + 2 * 32 * 16 + 32 * 32)
    assert attn["scores"] == attn["pv"] == 2 * 2 * 16 * 16


def test_benchmark_config_never_halts():
    cfg = presets.benchmark_config("default")
    assert cfg.act_threshold == presets.NO_HALT_THRESHOLD
    assert (cfg.dim, cfg.n_experts, cfg.n_experts_per_tok, cfg.max_loop_iters,
            cfg.vocab_size, cfg.max_seq_len) == (256, 16, 2, 8, 4096, 128)
    with pytest.raises(ValueError, match="preset"):
        presets.benchmark_config("nope")


# ---------------------------------------------------------------------------- run_benchmark
def test_result_structure_and_sanity(result):
    assert result["batch"] == 2 and result["seq_len"] == 16 and result["n_loops"] == 2
    assert result["tokens_per_step"] == 32
    assert result["config"]["act_threshold"] == presets.NO_HALT_THRESHOLD
    assert result["peak"]["peak_flops"] == max(result["peak"]["jax_matmul_flops"],
                                               result["peak"]["torch_matmul_flops"]) > 0
    assert result["flops"]["train_per_token"] == 3 * result["flops"]["forward_per_token"] > 0
    for phase in ("forward", "train"):
        r = result[phase]
        for side in ("torch", "jax"):
            s = r[side]
            assert s["tokens_per_s"] > 0 and s["median_s"] > 0 and len(s["times_s"]) == 2
            assert 0 < s["fraction_of_peak"] < 1.5
        assert r["jax"]["compile_s"] > 0
        assert r["speedup"] == pytest.approx(r["jax"]["tokens_per_s"] / r["torch"]["tokens_per_s"])


def test_both_sides_compute_the_same(result):
    assert result["parity"]["max_abs_logit_diff"] < 1e-4
    assert result["parity"]["loss_diff"] < 1e-4
    # the router hook fired once per loop: open-mythos ran every loop (no ACT early exit)
    assert result["routing"]["loops"] == result["n_loops"]


def test_format_table(result):
    text = torch_compare.format_table(result)
    for needle in ("GFLOP/s", "torch tok/s", "jax tok/s", "speedup", "jax compile s",
                   "forward", "train step", "logit diff", "dim=32"):
        assert needle in text
    json.dumps(result)                                               # JSON-able


# ---------------------------------------------------------------------------- the script
def test_script_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "experiments", "bench_vs_torch.py"), "--preset",
         "tiny", "--quick", "--no-train", "--iters", "2", "--loops", "1", "-q",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch tok/s" in proc.stdout
    figures = json.loads(out.read_text())
    assert figures["n_loops"] == 1 and figures["config"]["max_loop_iters"] == 1
    assert figures["train"] is None
    assert figures["forward"]["jax"]["tokens_per_s"] > 0
    assert figures["parity"]["max_abs_logit_diff"] < 1e-4
