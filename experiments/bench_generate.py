"""Text generation, mythos-jax vs OpenMythos 0.5.0 (PyTorch), fp32 CPU, same weights, same run.

    python experiments/bench_generate.py                  # small MoE config, ~1-2 min on 2 cores
    python experiments/bench_generate.py --json out.json  # also write every figure
    python experiments/bench_generate.py --quick          # smoke test (seconds)

Measured (see experiments/README.md, section "bench_generate.py"):

* generate tokens/s: OpenMythos's own ``OpenMythos.generate`` (growing ``torch.cat`` caches,
  temperature 1, top-k) against ``mythos_jax.inference.generate.generate`` with the same
  sampling (temperature 1, top-k) and greedy, after a warm-up call that compiles; the ratio.
  Each side's time is split into prefill and decode (per-forward timestamps on the torch side,
  ``on_token`` timestamps on the JAX side);
* decode-only: the jitted greedy decode step (``compiled_decoder(...).step``) alone on a prepared cache (``block_until_ready``);
* cache bytes per token: measured (the arrays of the ``KVCache``; the tensors of OpenMythos's
  cache dict after its ``generate``) for the benchmark config, analytic for ``mythos_1b``
  (``cache_values_per_token`` / ``openmythos_cache_values_per_token``, fp32, 16 loops);
* position scaling: time per decode step at cache position 64 and 1024 (one cache of
  ``max_len`` >= 1100 slots), both implementations.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import numpy as np

from mythos_jax.bench.presets import NO_HALT_THRESHOLD
from mythos_jax.bench.timing import CpuMonitor, machine_info, settle, wait_for_idle, write_json
from mythos_jax.bench.torch_compare import build_models
from mythos_jax.config import MythosConfig

_KEY = None  # greedy decoding: the sampling key is unused

#: The benchmark model: a small MLA + MoE config (16 experts, top-2, 4 loops, vocab 4096).
SMALL = dict(
    vocab_size=4096, dim=128, n_heads=4, n_kv_heads=2, max_loop_iters=4,
    prelude_layers=1, coda_layers=1, attn_type="mla",
    q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
    v_head_dim=32, n_experts=16, n_shared_experts=1, n_experts_per_tok=2, expert_dim=64,
    lora_rank=8, rope_theta=500000.0, dropout=0.0, act_threshold=NO_HALT_THRESHOLD,
    max_seq_len=1152)
#: ``--quick`` (tests): the same shape of run on a tiny model and short sequences.
TINY = dict(SMALL, vocab_size=128, dim=32, n_heads=2, n_kv_heads=1, max_loop_iters=2,
            q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
            v_head_dim=8, n_experts=4, expert_dim=16, lora_rank=4, max_seq_len=96)

FULL_RUN = dict(batch=8, prompt_len=32, new_tokens=256, n_loops=4, top_k=50, reps=3,
                decode_steps=64, positions=(64, 1024), position_max_len=1100,
                position_steps=16, parity_steps=8, torch_threads=(1,))
# (--quick reuses the generate cache length for every phase: 2 prefill + 1 decode compiles)
QUICK_RUN = dict(batch=2, prompt_len=8, new_tokens=16, n_loops=2, top_k=20, reps=1,
                 decode_steps=6, positions=(8, 16), position_max_len=24, position_steps=4,
                 parity_steps=4, torch_threads=(1,))

AIM_SPEEDUP = 10.0          # mythos-jax decode throughput >= 10x OpenMythos's
AIM_POSITION_RATIO = 1.5    # step time at the long position <= 1.5x that at the short one


def _log(msg: str) -> None:
    print(f"[bench_generate] {msg}", file=sys.stderr, flush=True)


# ============================================================================ OpenMythos
class _ForwardRecorder:
    """Wraps ``torch_model.forward`` (``generate`` calls ``self.forward``) to time every call
    and keep the cache dict it was given; restores the method on exit."""

    def __init__(self, torch_model):
        self.model = torch_model
        self.times: list[float] = []
        self.cache: dict | None = None

    def __enter__(self):
        original = self.model.forward

        def forward(*args, **kwargs):
            self.cache = kwargs.get("kv_cache", self.cache)
            start = time.perf_counter()
            out = original(*args, **kwargs)
            self.times.append(time.perf_counter() - start)
            return out

        self.model.forward = forward
        return self

    def __exit__(self, *exc):
        del self.model.forward


def torch_cache_bytes(cache: dict) -> dict[str, Any]:
    """Bytes of OpenMythos's cache dict {layer: {name: (B, S, ...)}} per (sequence, token)."""
    total, batch, seq = 0, None, None
    for entry in cache.values():
        for tensor in entry.values():
            total += tensor.numel() * tensor.element_size()
            batch, seq = tensor.shape[0], tensor.shape[1]
    return {"total_bytes": total, "batch": batch, "seq_len": seq, "layers": len(cache),
            "bytes_per_token": total / (batch * seq)}


def torch_generate_run(torch_model, ids, new_tokens: int, n_loops: int, top_k: int,
                       seed: int) -> dict[str, Any]:
    """One ``OpenMythos.generate`` call: total, prefill (its first forward) and decode times."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad(), _ForwardRecorder(torch_model) as rec:
        start = time.perf_counter()
        out = torch_model.generate(ids, max_new_tokens=new_tokens, n_loops=n_loops,
                                   temperature=1.0, top_k=top_k)
        total = time.perf_counter() - start
    assert out.shape == (ids.shape[0], ids.shape[1] + new_tokens)
    decode_calls = rec.times[1:]
    return {"total_s": total, "prefill_s": rec.times[0],
            "decode_s": total - rec.times[0],       # every step after the prefill, sampling too
            "decode_forward_s": sum(decode_calls), "decode_steps": len(decode_calls),
            "cache": torch_cache_bytes(rec.cache)}


def torch_decode_at(torch_model, batch: int, position: int, n_loops: int, steps: int,
                    vocab: int, seed: int) -> list[float]:
    """Seconds per one-token OpenMythos forward with a cache holding ``position`` tokens."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, position), generator=gen)
    token = torch.randint(0, vocab, (batch, 1), generator=gen)
    cache: dict = {}
    times = []
    with torch.no_grad():
        torch_model(ids, n_loops=n_loops, kv_cache=cache, start_pos=0)
        for i in range(steps + 1):
            start = time.perf_counter()
            torch_model(token, n_loops=n_loops, kv_cache=cache, start_pos=position + i)
            times.append(time.perf_counter() - start)
    return times[1:]


# ============================================================================ mythos-jax
def jax_generate_run(model, prompts, new_tokens: int, n_loops: int, temperature: float,
                     top_k: int | None, seed: int) -> dict[str, Any]:
    """One ``generate`` call; the first ``on_token`` timestamp splits prefill (up to the first
    token) from decode (the rest, on the device in chunks of ``DECODE_CHUNK`` tokens: the
    chunk size ``generate`` uses without a callback)."""
    from mythos_jax.inference.generate import DECODE_CHUNK, generate

    stamps: list[float] = []
    start = time.perf_counter()
    result = generate(model, prompts, new_tokens, n_loops, temperature=temperature,
                      top_k=top_k, seed=seed, stream_chunk=DECODE_CHUNK,
                      on_token=lambda _t: stamps.append(time.perf_counter()))
    total = time.perf_counter() - start
    assert result.tokens.shape == (len(prompts), new_tokens) and len(stamps) == new_tokens
    return {"total_s": total, "prefill_s": stamps[0] - start, "decode_s": total - (
        stamps[0] - start), "decode_steps": new_tokens - 1}


def early_exit_tradeoff(model, prompts, new_tokens: int, n_loops: int,
                        rules=((None, 0.0), ("delta", 0.3), ("delta", 0.6), ("kl", 0.01))
                        ) -> list[dict[str, Any]]:
    """Per-sequence early exit in decode (greedy): loops per token, tokens/s and how many
    tokens equal the full-depth generation's, for each (rule, threshold); after a warm-up."""
    from mythos_jax.inference.generate import generate
    from mythos_jax.loops import LoopSpec

    rows, reference = [], None
    for rule, threshold in rules:
        kwargs = dict(loops=LoopSpec(n_loops, exit=rule, threshold=threshold), temperature=0.0)
        generate(model, prompts, new_tokens, **kwargs)
        start = time.perf_counter()
        result = generate(model, prompts, new_tokens, **kwargs)
        seconds = time.perf_counter() - start
        reference = result if rule is None else reference
        rows.append({"exit": rule or "off", "threshold": threshold,
                     "loops_per_token": float(result.loops.mean()),
                     "tokens_per_s": result.tokens.size / seconds,
                     "token_agreement": float((result.tokens == reference.tokens).mean())})
    return rows


def prefilled(model, batch: int, prompt_len: int, max_len: int, n_loops: int, seed: int):
    """(greedy decoder, model state, cache of ``max_len`` slots holding a random prompt of
    ``prompt_len`` tokens per row, prefilled)."""
    import jax.numpy as jnp
    from flax import nnx

    from mythos_jax.inference.cache import init_cache
    from mythos_jax.inference.generate import compiled_decoder
    from mythos_jax.loops import LoopSpec

    graphdef, state = nnx.split(model)
    decoder = compiled_decoder(graphdef, LoopSpec(n_loops))
    ids = np.random.default_rng(seed).integers(0, model.cfg.vocab_size, (batch, prompt_len))
    cache = init_cache(model.cfg, batch, max_len, n_loops)
    _, logits, cache, _ = decoder.prefill(state, jnp.asarray(ids, jnp.int32), cache, _KEY)
    logits.block_until_ready()
    return decoder, state, cache


def jax_decode_steps(model, batch: int, prompt_len: int, max_len: int, n_loops: int,
                     steps: int, seed: int, warmup: int = 2) -> list[float]:
    """Seconds per jitted greedy decode step (blocking) from cache position ``prompt_len`` on
    (after ``warmup`` untimed steps, which also compile)."""
    import jax.numpy as jnp

    decoder, state, cache = prefilled(model, batch, prompt_len, max_len, n_loops, seed)
    token = jnp.asarray(np.random.default_rng(seed + 1).integers(
        0, model.cfg.vocab_size, (batch,)), jnp.int32)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        _, logits, cache, _ = decoder.step(state, token, cache, _KEY)
        logits.block_until_ready()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def jax_cache_bytes(cfg: MythosConfig, batch: int, max_len: int, n_loops: int) -> dict:
    """Bytes of a ``KVCache``'s per-slot arrays (not ``index``/``start``) per (sequence, slot)."""
    import jax

    from mythos_jax.inference.cache import init_cache

    cache = init_cache(cfg, batch, max_len, n_loops)
    arrays = jax.tree.leaves((cache.prelude, cache.recurrent, cache.coda))
    total = sum(int(a.nbytes) for a in arrays)
    return {"total_bytes": total, "batch": batch, "max_len": max_len,
            "bytes_per_token": total / (batch * max_len)}


# ============================================================================ parity
def parity(torch_model, jax_model, ids: np.ndarray, n_loops: int, steps: int,
           max_len: int) -> dict:
    """Teacher-forced greedy decode on both sides (tokens: mythos-jax's argmax): the largest
    |logit difference| over the prefill and ``steps`` decode steps, and how often the two
    argmaxes agree."""
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from mythos_jax.inference.cache import init_cache
    from mythos_jax.inference.generate import compiled_decoder
    from mythos_jax.loops import LoopSpec

    batch, prompt_len = ids.shape
    graphdef, state = nnx.split(jax_model)
    decoder = compiled_decoder(graphdef, LoopSpec(n_loops))
    cache = init_cache(jax_model.cfg, batch, max(max_len, prompt_len + steps + 1), n_loops)
    _, jax_logits, cache, _ = decoder.prefill(state, jnp.asarray(ids, jnp.int32), cache,
                                               _KEY)
    torch_cache: dict = {}
    with torch.no_grad():
        torch_logits = torch_model(torch.from_numpy(ids.astype(np.int64)), n_loops=n_loops,
                                   kv_cache=torch_cache, start_pos=0)[:, -1]
    diffs, agree = [], []
    for step in range(steps + 1):
        j, t = np.asarray(jax_logits), torch_logits.numpy()
        diffs.append(float(np.max(np.abs(j - t))))
        agree.append(np.mean(j.argmax(-1) == t.argmax(-1)))
        if step == steps:
            break
        token = j.argmax(-1).astype(np.int32)
        _, jax_logits, cache, _ = decoder.step(state, jnp.asarray(token), cache, _KEY)
        with torch.no_grad():
            torch_logits = torch_model(torch.from_numpy(token[:, None].astype(np.int64)),
                                       n_loops=n_loops, kv_cache=torch_cache,
                                       start_pos=prompt_len + step)[:, -1]
    return {"max_abs_logit_diff": max(diffs), "argmax_agreement": float(np.mean(agree)),
            "decode_steps": steps}


# ============================================================================ the benchmark
def benchmark_model_config(quick: bool, overrides: dict | None = None
                           ) -> tuple[MythosConfig, dict[str, Any]]:
    """(model config, run shape) of the benchmark: ``SMALL`` and ``FULL_RUN``, or ``TINY`` and
    ``QUICK_RUN``; ``overrides`` change the run shape."""
    shape = dict(QUICK_RUN if quick else FULL_RUN, **(overrides or {}))
    cfg_fields = dict(TINY if quick else SMALL)
    cfg_fields["max_seq_len"] = max(cfg_fields["max_seq_len"], shape["position_max_len"],
                                    shape["prompt_len"] + shape["new_tokens"])
    return MythosConfig.from_dict(cfg_fields), shape


def run(quick: bool = False, seed: int = 0, spread_routing: bool = False,
        overrides: dict | None = None, log=_log) -> dict[str, Any]:
    import jax
    import torch

    from mythos_jax import variants
    from mythos_jax.inference.cache import (cache_values_per_token,
                                            openmythos_cache_values_per_token)

    wall_start = time.perf_counter()
    cfg, shape = benchmark_model_config(quick, overrides)
    B, P, N, L = shape["batch"], shape["prompt_len"], shape["new_tokens"], shape["n_loops"]
    top_k = shape["top_k"]

    log("building the models ...")
    torch_model, jax_model = build_models(cfg, seed, spread_routing)
    torch_model.eval()
    jax_model.eval()
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, P))
    ids_torch = torch.from_numpy(ids.astype(np.int64))
    prompts = ids.tolist()

    log("parity ...")
    par = parity(torch_model, jax_model, ids, L, shape["parity_steps"], P + N)

    # ------------------------------------------------------------ generate, both sides
    log("mythos-jax generate: warm-up (compiles) ...")
    first = {}
    for name, temperature in (("sampled", 1.0), ("greedy", 0.0)):
        start = time.perf_counter()
        jax_generate_run(jax_model, prompts, N, L, temperature,
                         top_k if temperature else None, seed)
        first[name] = time.perf_counter() - start
    default_threads = torch.get_num_threads()
    thread_counts = list(dict.fromkeys([default_threads, *shape["torch_threads"]]))
    log("OpenMythos generate: warm-up ...")
    for threads in thread_counts:
        torch.set_num_threads(threads)
        torch_generate_run(torch_model, ids_torch, min(N, 8), L, top_k, seed)

    log(f"timing generate ({shape['reps']} rounds, sides taking turns; OpenMythos with "
        f"{' and '.join(map(str, thread_counts))} torch threads) ...")
    runs: dict[str, list[dict]] = {"mythos_jax": [], "mythos_jax_greedy": []}
    runs.update({f"openmythos_{t}_threads": [] for t in thread_counts})
    monitor = CpuMonitor()
    try:
        for r in range(shape["reps"]):
            settle()
            runs["mythos_jax"].append(jax_generate_run(jax_model, prompts, N, L, 1.0, top_k,
                                                       seed + r))
            for threads in thread_counts:
                torch.set_num_threads(threads)
                settle()
                runs[f"openmythos_{threads}_threads"].append(torch_generate_run(
                    torch_model, ids_torch, N, L, top_k, seed + r))
            settle()
            runs["mythos_jax_greedy"].append(jax_generate_run(jax_model, prompts, N, L, 0.0,
                                                              None, seed + r))
    finally:
        torch.set_num_threads(default_threads)
    contention = {"generate": monitor.other_share()}

    def summary(rs: list[dict]) -> dict[str, Any]:
        total = statistics.median([r["total_s"] for r in rs])
        decode = statistics.median([r["decode_s"] for r in rs])
        steps = rs[0]["decode_steps"]
        out = {"total_s": total, "prefill_s": statistics.median([r["prefill_s"] for r in rs]),
               "decode_s": decode, "decode_s_per_step": decode / steps,
               "tokens_per_s": B * N / total, "decode_tokens_per_s": B * steps / decode,
               "times_s": [r["total_s"] for r in rs]}
        if "decode_forward_s" in rs[0]:
            out["decode_forward_s_per_step"] = statistics.median(
                [r["decode_forward_s"] / r["decode_steps"] for r in rs])
        return out

    gen = {name: summary(rs) for name, rs in runs.items()}
    for name in ("mythos_jax", "mythos_jax_greedy"):
        key = "sampled" if name == "mythos_jax" else "greedy"
        gen[name]["first_call_s"] = first[key]
        gen[name]["compile_s"] = max(first[key] - gen[name]["total_s"], 0.0)
    # OpenMythos at its best thread count (decode throughput)
    best_threads = max(thread_counts, key=lambda t: gen[f"openmythos_{t}_threads"][
        "decode_tokens_per_s"])
    om = gen["openmythos"] = dict(gen[f"openmythos_{best_threads}_threads"],
                                  torch_threads=best_threads)
    gen["torch_thread_counts"] = thread_counts
    gen["speedup"] = gen["mythos_jax"]["tokens_per_s"] / om["tokens_per_s"]
    gen["decode_speedup"] = gen["mythos_jax"]["decode_tokens_per_s"] / om["decode_tokens_per_s"]
    gen["greedy_speedup"] = gen["mythos_jax_greedy"]["tokens_per_s"] / om["tokens_per_s"]
    gen["greedy_decode_speedup"] = (gen["mythos_jax_greedy"]["decode_tokens_per_s"]
                                    / om["decode_tokens_per_s"])

    # ------------------------------------------------------------ decode_step alone
    log("timing decode_step alone ...")
    monitor = CpuMonitor()
    step_times = jax_decode_steps(jax_model, B, P, P + N, L, shape["decode_steps"], seed)
    contention["decode_only"] = monitor.other_share()
    step_s = statistics.median(step_times)
    decode_only = {
        "mythos_jax": {"step_s": step_s, "min_s": min(step_times), "tokens_per_s": B / step_s,
                       "max_len": P + N, "steps": len(step_times)},
        "openmythos": {"step_s": om["decode_forward_s_per_step"],
                       "tokens_per_s": B / om["decode_forward_s_per_step"],
                       "note": "its forward calls inside generate (sampling excluded)"},
    }
    decode_only["speedup"] = (decode_only["mythos_jax"]["tokens_per_s"]
                              / decode_only["openmythos"]["tokens_per_s"])

    # ------------------------------------------------------------ cache bytes
    jax_bytes = jax_cache_bytes(cfg, B, P + N, L)
    om_bytes = runs[f"openmythos_{best_threads}_threads"][-1]["cache"]
    big = variants.mythos_1b()
    big_loops = big.max_loop_iters
    cache = {
        "benchmark_config": {
            "n_loops": L, "dtype": "float32",
            "mythos_jax_measured": jax_bytes["bytes_per_token"],
            "mythos_jax_analytic": 4 * cache_values_per_token(cfg, L),
            "openmythos_measured": om_bytes["bytes_per_token"],
            "openmythos_analytic": 4 * openmythos_cache_values_per_token(cfg, L),
            "mythos_jax_arrays": jax_bytes, "openmythos_tensors": om_bytes},
        "mythos_1b": {
            "n_loops": big_loops, "dtype": "float32",
            "mythos_jax": 4 * cache_values_per_token(big, big_loops),
            "openmythos": 4 * openmythos_cache_values_per_token(big, big_loops),
            "mythos_jax_per_4096_tokens_mib": 4 * cache_values_per_token(big, big_loops)
            * 4096 / 2 ** 20,
            "openmythos_per_4096_tokens_mib": 4 * openmythos_cache_values_per_token(
                big, big_loops) * 4096 / 2 ** 20},
    }
    for entry, (ours, theirs) in ((cache["benchmark_config"],
                                   ("mythos_jax_measured", "openmythos_measured")),
                                  (cache["mythos_1b"], ("mythos_jax", "openmythos"))):
        entry["ratio"] = entry[theirs] / entry[ours]   # OpenMythos bytes / mythos-jax bytes

    # ------------------------------------------------------------ position scaling
    short, long_ = shape["positions"]
    max_len = shape["position_max_len"]
    log(f"timing decode steps at positions {short} and {long_} (cache of {max_len}) ...")
    monitor = CpuMonitor()
    jax_short = jax_decode_steps(jax_model, B, short, max_len, L, shape["position_steps"], seed)
    jax_long = jax_decode_steps(jax_model, B, long_, max_len, L, shape["position_steps"], seed)
    torch.set_num_threads(best_threads)
    try:
        om_short = torch_decode_at(torch_model, B, short, L, shape["position_steps"],
                                   cfg.vocab_size, seed)
        om_long = torch_decode_at(torch_model, B, long_, L, shape["position_steps"],
                                  cfg.vocab_size, seed)
    finally:
        torch.set_num_threads(default_threads)
    contention["position"] = monitor.other_share()
    position = {"short": short, "long": long_, "max_len": max_len,
                "steps": shape["position_steps"]}
    for name, (s, l) in (("mythos_jax", (jax_short, jax_long)),
                         ("openmythos", (om_short, om_long))):
        position[name] = {"step_s_short": statistics.median(s), "step_s_long": statistics.median(l),
                          "ratio": statistics.median(l) / statistics.median(s)}

    log("per-sequence early exit in decode ...")
    exits = early_exit_tradeoff(jax_model, prompts, N, L)

    result = {
        "early_exit": exits,
        "config": cfg.to_dict(), "quick": quick, "seed": seed, "spread_routing": spread_routing,
        "batch": B, "prompt_len": P, "new_tokens": N, "n_loops": L,
        "sampling": {"openmythos": f"temperature 1.0, top_k {top_k} (its generate)",
                     "mythos_jax": f"temperature 1.0, top_k {top_k}",
                     "mythos_jax_greedy": "temperature 0 (argmax)"},
        "machine": machine_info(), "jax_devices": [str(d) for d in jax.devices()],
        "parity": par, "contention": contention, "generate": gen,
        "decode_only": decode_only, "cache_bytes_per_token": cache,
        "position_scaling": position,
        "aims": {"decode_speedup_target": AIM_SPEEDUP,
                 "decode_speedup": gen["decode_speedup"],
                 "decode_speedup_met": gen["decode_speedup"] >= AIM_SPEEDUP,
                 "position_ratio_target": AIM_POSITION_RATIO,
                 "position_ratio": position["mythos_jax"]["ratio"],
                 "position_ratio_met": position["mythos_jax"]["ratio"] <= AIM_POSITION_RATIO},
    }
    result["wall_s"] = time.perf_counter() - wall_start
    return result


# ============================================================================ the table
def _table(cols, rows) -> list[str]:
    widths = [max(len(str(r[i])) for r in (cols, *rows)) for i in range(len(cols))]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in (cols, *rows)]
    rule = "-" * len(lines[0])
    return [rule, lines[0], rule, *lines[1:], rule]


def format_result(r: dict[str, Any]) -> str:
    cfg, m, g = r["config"], r["machine"], r["generate"]
    out = [
        f"machine: {m['cpu']}, {m['cpu_count']} cores, torch threads {m['torch_threads']}, "
        f"jax {m['jax']} ({m['jax_backend']}), torch {m['torch']}",
        f"config: {cfg['attn_type']} dim={cfg['dim']} heads={cfg['n_heads']} "
        f"kv_lora={cfg['kv_lora_rank']} rope={cfg['qk_rope_head_dim']} "
        f"experts={cfg['n_experts']} top-{cfg['n_experts_per_tok']} "
        f"shared={cfg['n_shared_experts']} expert_dim={cfg['expert_dim']} "
        f"vocab={cfg['vocab_size']} prelude/coda={cfg['prelude_layers']}/{cfg['coda_layers']} "
        f"moe_impl={cfg['moe_impl']} weights="
        f"{'moved from init (spread routing)' if r['spread_routing'] else 'init'}",
        f"batch {r['batch']} prompts x {r['prompt_len']} tokens, {r['new_tokens']} new tokens, "
        f"{r['n_loops']} loops; sampling: OpenMythos {r['sampling']['openmythos']}, "
        f"mythos-jax {r['sampling']['mythos_jax']} and greedy",
        f"parity (teacher-forced greedy, prefill + {r['parity']['decode_steps']} decode steps): "
        f"max |logit diff| {r['parity']['max_abs_logit_diff']:.2e}, argmax agreement "
        f"{100 * r['parity']['argmax_agreement']:.0f}%",
    ]
    busy = {k: v for k, v in r["contention"].items() if v is not None}
    if busy:
        out.append("CPU busy with other processes while timing: " + ", ".join(
            f"{k} {100 * v:.0f}%" for k, v in busy.items()))
        if max(busy.values()) > 0.10:
            out.append("WARNING: other processes used this machine during the run; the "
                       "figures are not trustworthy, rerun on an idle machine")
    out.append("")
    out.append(f"generate ({r['new_tokens']} new tokens x {r['batch']} sequences; "
               "decode = everything after the first token)")
    rows = []
    best = g["openmythos"]["torch_threads"]
    sides = [(f"OpenMythos, {t} thread{'s' if t > 1 else ''}" + (" *" if t == best else ""),
              f"openmythos_{t}_threads") for t in g["torch_thread_counts"]]
    sides += [("mythos-jax sampled", "mythos_jax"), ("mythos-jax greedy", "mythos_jax_greedy")]
    for name, key in sides:
        s, torch_side = g[key], key.startswith("openmythos")
        rows.append((name, f"{s['total_s']:.3f}", f"{s['tokens_per_s']:,.0f}",
                     f"{1e3 * s['prefill_s']:.1f}", f"{1e3 * s['decode_s_per_step']:.2f}",
                     f"{s['decode_tokens_per_s']:,.0f}",
                     f"{s['tokens_per_s'] / g['openmythos']['tokens_per_s']:.1f}x",
                     f"{s['decode_tokens_per_s'] / g['openmythos']['decode_tokens_per_s']:.1f}x",
                     "-" if torch_side else f"{s['compile_s']:.1f}"))
    out += _table(("", "total s", "tok/s", "prefill ms", "ms/step", "decode tok/s",
                   "speedup", "decode speedup", "compile s"), rows)
    out.append("(* = OpenMythos at its best torch thread count: the reference of the speedups; "
               "ms/step and decode = after the first token, sampling included)")
    d = r["decode_only"]
    out.append("")
    out.append("decode step alone (no sampling): mythos-jax jitted decode_step "
               f"{1e3 * d['mythos_jax']['step_s']:.2f} ms ({d['mythos_jax']['tokens_per_s']:,.0f} "
               f"tok/s); OpenMythos forward {1e3 * d['openmythos']['step_s']:.2f} ms "
               f"({d['openmythos']['tokens_per_s']:,.0f} tok/s, {best} torch thread(s)); "
               f"{d['speedup']:.1f}x")
    c = r["cache_bytes_per_token"]
    cb, c1 = c["benchmark_config"], c["mythos_1b"]
    out.append("")
    out.append("KV cache bytes per token (per sequence, all layers and loop depths, fp32)")
    out += _table(
        ("", "mythos-jax", "OpenMythos", "OpenMythos / mythos-jax"),
        [(f"this config, {cb['n_loops']} loops (measured)", f"{cb['mythos_jax_measured']:,.0f}",
          f"{cb['openmythos_measured']:,.0f}", f"{cb['ratio']:.2f}x"),
         (f"this config, {cb['n_loops']} loops (analytic)", f"{cb['mythos_jax_analytic']:,.0f}",
          f"{cb['openmythos_analytic']:,.0f}", ""),
         (f"mythos_1b, {c1['n_loops']} loops (analytic)", f"{c1['mythos_jax']:,.0f}",
          f"{c1['openmythos']:,.0f}", f"{c1['ratio']:.2f}x")])
    p = r["position_scaling"]
    out.append("")
    out.append(f"decode step time vs cache position (batch {r['batch']}, one cache of "
               f"{p['max_len']} slots for mythos-jax; OpenMythos with {best} torch thread(s); "
               f"median of {p['steps']} steps)")
    out += _table(("", f"ms at {p['short']}", f"ms at {p['long']}", "ratio"),
                  [(name, f"{1e3 * p[key]['step_s_short']:.2f}",
                    f"{1e3 * p[key]['step_s_long']:.2f}", f"{p[key]['ratio']:.2f}x")
                   for name, key in (("mythos-jax decode_step", "mythos_jax"),
                                     ("OpenMythos one-token forward", "openmythos"))])
    out.append("")
    out.append(f"per-sequence early exit in decode (greedy, {r['n_loops']} loops max; "
               "agreement = tokens equal to the full-depth generation)")
    out += _table(("exit", "threshold", "loops/token", "tok/s", "agreement"),
                  [(e["exit"], f"{e['threshold']:g}", f"{e['loops_per_token']:.2f}",
                    f"{e['tokens_per_s']:,.0f}", f"{100 * e['token_agreement']:.1f}%")
                   for e in r["early_exit"]])
    a = r["aims"]
    out.append("")
    out.append(f"aims: decode throughput {a['decode_speedup']:.1f}x OpenMythos "
               f"(target >= {a['decode_speedup_target']:.0f}x: "
               f"{'met' if a['decode_speedup_met'] else 'NOT met'}); step time at "
               f"{p['long']} / at {p['short']} = {a['position_ratio']:.2f}x (target <= "
               f"{a['position_ratio_target']}x: {'met' if a['position_ratio_met'] else 'NOT met'})")
    return "\n".join(out)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, short runs (tests)")
    p.add_argument("--json", metavar="PATH", help="write all figures here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spread-routing", action="store_true",
                   help="weights moved away from init so tokens spread over the experts")
    p.add_argument("--batch", type=int, help="prompts per batch (default 8)")
    p.add_argument("--new-tokens", type=int, help="new tokens per prompt (default 256)")
    p.add_argument("--reps", type=int, help="timed generate calls per side (default 3)")
    p.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                   help="first wait up to SECONDS for other processes to leave the CPU idle")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    log = (lambda _m: None) if args.quiet else _log
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle, log=log)
    overrides = {k: v for k, v in (("batch", args.batch), ("new_tokens", args.new_tokens),
                                   ("reps", args.reps)) if v is not None}
    result = run(quick=args.quick, seed=args.seed, spread_routing=args.spread_routing,
                 overrides=overrides, log=log)
    print(format_result(result))
    print(f"(wall time {result['wall_s']:.0f} s)")
    write_json(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
