"""experiments/bench_generate.py --quick as a subprocess: its table, and the structure and
sanity of its --json figures (generate mythos-jax vs OpenMythos, cache bytes, position scaling)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mythos_jax.platforms import CACHE_MAX_BYTES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "bench_generate.py")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_generate") / "figures.json"
    # the suite's compilation cache (conftest.py), with its size bound: JAX's file lock
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.environ["MYTHOS_JAX_CACHE"],
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
           "JAX_COMPILATION_CACHE_MAX_SIZE": str(CACHE_MAX_BYTES)}
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--quiet", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        return proc.stdout, json.load(f)


def test_table_is_printed(run):
    stdout, _ = run
    for text in ("OpenMythos, 1 thread", "mythos-jax sampled", "mythos-jax greedy",
                 "decode step alone", "KV cache bytes per token", "mythos_1b, 16 loops",
                 "decode step time vs cache position", "aims:", "figures written to"):
        assert text in stdout, text


def test_json_structure(run):
    _, r = run
    assert r["quick"] is True
    for key in ("config", "batch", "prompt_len", "new_tokens", "n_loops", "sampling",
                "machine", "parity", "contention", "generate", "decode_only",
                "cache_bytes_per_token", "position_scaling", "aims", "wall_s"):
        assert key in r, key
    g = r["generate"]
    for side in ("openmythos", "mythos_jax", "mythos_jax_greedy"):
        for key in ("total_s", "prefill_s", "decode_s", "decode_s_per_step", "tokens_per_s",
                    "decode_tokens_per_s", "times_s"):
            assert key in g[side], (side, key)
    for side in ("mythos_jax", "mythos_jax_greedy"):
        assert g[side]["first_call_s"] > 0 and g[side]["compile_s"] >= 0
    # OpenMythos at each torch thread count; the reference is the fastest of them
    assert 1 in g["torch_thread_counts"]
    per_threads = {t: g[f"openmythos_{t}_threads"] for t in g["torch_thread_counts"]}
    best = g["openmythos"]["torch_threads"]
    assert g["openmythos"]["decode_tokens_per_s"] == max(
        s["decode_tokens_per_s"] for s in per_threads.values())
    assert g["openmythos"]["total_s"] == per_threads[best]["total_s"]
    for key in ("speedup", "decode_speedup", "greedy_speedup", "greedy_decode_speedup"):
        assert g[key] > 0, key
    assert r["decode_only"]["speedup"] > 0
    for key in ("decode_speedup", "decode_speedup_met", "position_ratio", "position_ratio_met"):
        assert key in r["aims"], key


def test_throughputs_are_positive_and_consistent(run):
    _, r = run
    g, B, N = r["generate"], r["batch"], r["new_tokens"]
    for side in ("openmythos", "mythos_jax", "mythos_jax_greedy"):
        s = g[side]
        assert s["tokens_per_s"] > 0 and s["decode_tokens_per_s"] > 0
        assert s["tokens_per_s"] == pytest.approx(B * N / s["total_s"])
        assert 0 < s["prefill_s"] < s["total_s"]
    assert g["speedup"] == pytest.approx(
        g["mythos_jax"]["tokens_per_s"] / g["openmythos"]["tokens_per_s"])
    for side in ("mythos_jax", "openmythos"):
        assert r["decode_only"][side]["tokens_per_s"] > 0
        p = r["position_scaling"][side]
        assert p["step_s_short"] > 0 and p["step_s_long"] > 0
        assert p["ratio"] == pytest.approx(p["step_s_long"] / p["step_s_short"])
    assert r["aims"]["position_ratio"] == r["position_scaling"]["mythos_jax"]["ratio"]


def test_cache_bytes(run):
    _, r = run
    c = r["cache_bytes_per_token"]
    small, big = c["benchmark_config"], c["mythos_1b"]
    assert r["config"]["attn_type"] == "mla"
    # measured bytes are what the analytic counts say, and MLA's shared rope key is smaller
    assert small["mythos_jax_measured"] == small["mythos_jax_analytic"]
    assert small["openmythos_measured"] == small["openmythos_analytic"]
    assert 0 < small["mythos_jax_measured"] < small["openmythos_measured"]
    assert small["openmythos_tensors"]["seq_len"] == r["prompt_len"] + r["new_tokens"] - 1
    # mythos_1b, fp32, 16 loops: (kv_lora 256 + rope 32) vs (256 + 16 heads x 32) per layer,
    # 2 + 16 + 2 layer-depths
    assert big["n_loops"] == 16
    assert big["mythos_jax"] == 4 * (256 + 32) * 20
    assert big["openmythos"] == 4 * (256 + 16 * 32) * 20
    assert big["ratio"] == pytest.approx(big["openmythos"] / big["mythos_jax"])


def test_same_model_on_both_sides(run):
    _, r = run
    assert r["parity"]["max_abs_logit_diff"] < 1e-3
    assert r["parity"]["argmax_agreement"] == 1.0
