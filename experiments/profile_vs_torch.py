"""Where the time goes, mythos-jax against open-mythos 0.5.0 on the same CPU: one profile per
benchmark target of issue 17 (the forward and the training step of bench_vs_torch.py, the MoE
layer's forward+backward of bench_moe.py, one cached decode step of bench_generate.py, and,
on our side only, the trainer's step of `make train`'s looped arm with its MFU), each
call split into matmul, gather/scatter, sort/top-k, elementwise, copy/layout and runtime (wall
time no op covers) on both sides, with each side's matmul rate as a share of the measured fp32
matmul peak.

    python experiments/profile_vs_torch.py --wait-idle 600 --json profile.json
    python experiments/profile_vs_torch.py --only train --spread-routing
    python experiments/profile_vs_torch.py --quick        # tiny shapes, a smoke test

The split tells what a speedup can still come from: when open-mythos's whole call takes less
than twice our matmul time, 2x needs faster matmuls, not less overhead. The library is
``mythos_jax.bench.profile``; the shapes and weights are those of the benchmarks.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mythos_jax.bench.presets import PRESET_SHAPES, benchmark_config
from mythos_jax.bench.profile import format_profiles, jax_profile, torch_profile
from mythos_jax.bench.timing import (CONTENTION_WARNING, CpuMonitor, machine_info,
                                     measure_matmul_peak, wait_for_idle, write_json)
from mythos_jax.bench.torch_compare import (build_models, jax_forward_fn, jax_train_step_fn,
                                            torch_train_step_fn)
from mythos_jax.flop_count import flops as count_flops

TARGETS = ("forward", "train", "moe", "decode", "make_train")
# `make train`'s looped arm: the khop preset at 6 fixed loops (looped_fixed's depth), so that every
# profiled step does the same work (its FLOPs give the MFU of the profiled steps).
MAKE_TRAIN_SETTINGS = ("loops.schedule=fixed", "loops.n=6", "mesh=data=1", "data.prefetch=0")


def _sibling_script(name: str):
    """Another script of experiments/ (bench_moe, bench_generate) imported as a module."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    return importlib.import_module(name)


def _model_targets(args, wanted):
    """(name, torch fn, jax compiled fn, hlo text, matmul FLOPs) for forward and train."""
    import torch

    shape = PRESET_SHAPES["tiny" if args.quick else "default"]
    cfg = benchmark_config("tiny" if args.quick else "default",
                           {"max_loop_iters": shape["n_loops"]}, seq_len=shape["seq_len"])
    batch, seq, loops = shape["batch"], shape["seq_len"], shape["n_loops"]
    torch_model, jax_model = build_models(cfg, args.seed, args.spread_routing)
    ids_np = np.random.default_rng(args.seed).integers(0, cfg.vocab_size, (batch, seq))
    ids_torch, ids = torch.from_numpy(ids_np.astype(np.int64)), jnp.asarray(ids_np, jnp.int32)
    counts = count_flops(cfg, seq, loops)
    if "forward" in wanted:
        forward, state = jax_forward_fn(jax_model, loops)
        forward_compiled = forward.lower(state, ids).compile()
        torch_model.eval()

        def torch_forward():
            with torch.no_grad():
                torch_model(ids_torch, n_loops=loops)

        yield ("forward", torch_forward, lambda: forward_compiled(state, ids),
               forward_compiled.as_text(),
               counts["forward"] * batch * seq)
    if "train" in wanted:
        step, params, opt_state, rest = jax_train_step_fn(jax_model, loops)
        compiled = step.lower(params, opt_state, rest, ids).compile()
        carry = [params, opt_state]

        def jax_step():
            carry[0], carry[1], loss = compiled(carry[0], carry[1], rest, ids)
            return loss

        yield ("train", torch_train_step_fn(torch_model, ids_torch, loops), jax_step,
               compiled.as_text(), counts["train"] * batch * seq)


def _moe_target(args):
    """The MoE layer's forward+backward (bench_moe.py's shapes and weights)."""
    bench_moe = _sibling_script("bench_moe")
    setup = bench_moe.moe_setup(bench_moe.parse_args(["--quick"] if args.quick else []))
    cfg, x = setup["config"], setup["x"]
    _, torch_fwd_bwd, _ = bench_moe.torch_side(setup["torch_moe"], x)
    side = bench_moe.jax_side(bench_moe.jax_moe(setup), x)
    active = cfg.n_experts_per_tok + cfg.n_shared_experts
    tokens = setup["batch"] * setup["seq_len"]
    matmul = 3 * tokens * active * 3 * 2 * cfg.dim * cfg.expert_dim     # fwd + 2x bwd
    return ("moe", torch_fwd_bwd, side["fwd+bwd"], side["hlo"], matmul)


def _decode_target(args):
    """One cached greedy decode step (bench_generate.py's model, batch and position)."""
    import torch

    bench_generate = _sibling_script("bench_generate")

    cfg, shape = bench_generate.benchmark_model_config(args.quick)
    torch_model, jax_model = build_models(cfg, args.seed, args.spread_routing)
    torch_model.eval()
    jax_model.eval()
    batch, position, loops = shape["batch"], shape["positions"][0], shape["n_loops"]
    decoder, state, cache = bench_generate.prefilled(jax_model, batch, position,
                                                     shape["position_max_len"], loops,
                                                     args.seed)
    token = jnp.zeros((batch,), jnp.int32)
    compiled = decoder.step.lower(state, token, cache, None).compile()
    carry = [cache]

    def jax_step():
        _, logits, carry[0], _ = compiled(state, token, carry[0], None)
        return logits

    torch_cache: dict = {}
    ids = torch.randint(0, cfg.vocab_size, (batch, position),
                        generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        torch_model(ids, n_loops=loops, kv_cache=torch_cache, start_pos=0)
    where = [position]

    def torch_step():
        with torch.no_grad():
            torch_model(ids[:, :1], n_loops=loops, kv_cache=torch_cache, start_pos=where[0])
        where[0] += 1

    return ("decode", torch_step, jax_step, compiled.as_text(), None)


def _make_train_target(args):
    """The trainer's own jitted step (``train.step.make_train_step``) on `make train`'s looped
    arm; no torch side (open-mythos has no trainer)."""
    from mythos_jax.parallel.mesh import make_mesh
    from mythos_jax.train.config import load_train_config
    from mythos_jax.train.data import train_iterator
    from mythos_jax.train.evaluate import global_batch
    from mythos_jax.train.step import build_plan, init_train_state, make_train_step
    from mythos_jax.train.trainer import train_flops_fn

    cfg = load_train_config("khop", list(MAKE_TRAIN_SETTINGS))
    plan = build_plan(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    state = [init_train_state(plan)]
    batch = global_batch(plan, next(train_iterator(cfg.data)))
    compiled = make_train_step(plan).jitted.lower(state[0], batch).compile()

    def jax_step():
        state[0], metrics = compiled(state[0], batch)
        return metrics

    tokens = cfg.data.batch_size * cfg.data.seq_len
    return ("make_train", None, jax_step, compiled.as_text(),
            train_flops_fn(plan)(cfg.loops.n) * tokens)


def run(args) -> dict:
    wanted = args.only or TARGETS
    peak = measure_matmul_peak((512, 1024) if args.quick else (1024, 2048),
                               repeats=3 if args.quick else 5)
    targets = list(_model_targets(args, wanted))
    if "moe" in wanted:
        targets.append(_moe_target(args))
    if "decode" in wanted:
        targets.append(_decode_target(args))
    if "make_train" in wanted:
        targets.append(_make_train_target(args))
    result = {"machine": machine_info(), "peak": peak, "reps": args.reps,
              "spread_routing": args.spread_routing, "quick": args.quick, "targets": {}}
    monitor = CpuMonitor()
    for name, torch_fn, jax_fn, hlo, matmul_flops in targets:
        print(f"[profile] {name} ...", file=sys.stderr, flush=True)
        sides = {"open-mythos": torch_profile(torch_fn, args.reps)} if torch_fn else {}
        sides["mythos-jax"] = jax_profile(jax_fn, hlo, args.reps)
        result["targets"][name] = {**sides, "matmul_flops": matmul_flops}
    result["contention"] = monitor.other_share()     # CPU share of other processes meanwhile
    return result


def format_result(result: dict) -> str:
    lines = [f"fp32 matmul peak {result['peak']['peak_flops'] / 1e9:.1f} GFLOP/s; "
             f"ms per call, {result['reps']} profiled calls per side"
             + ("; spread routing" if result["spread_routing"] else "")]
    if (result["contention"] or 0) > CONTENTION_WARNING:
        lines.append(f"WARNING: other processes used {100 * result['contention']:.0f}% of the "
                     "CPU during the run; the figures are not trustworthy, rerun on an idle "
                     "machine")
    for name, target in result["targets"].items():
        sides = {k: v for k, v in target.items() if k != "matmul_flops"}
        lines += ["", f"== {name}",
                  format_profiles(sides, target["matmul_flops"], result["peak"]["peak_flops"])]
        ours, theirs = sides["mythos-jax"], sides.get("open-mythos")
        if theirs is None:
            flop_rate = target["matmul_flops"] / (ours["wall_ms"] / 1e3)
            lines.append(f"MFU of the profiled steps "
                         f"{100 * flop_rate / result['peak']['peak_flops']:.1f}%")
        else:
            lines.append(f"speedup {theirs['wall_ms'] / ours['wall_ms']:.2f}x; open-mythos's "
                         f"wall / our matmul time: {theirs['wall_ms'] / ours['ms']['matmul']:.2f}x")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", type=lambda s: s.split(","), help=f"some of {','.join(TARGETS)}")
    p.add_argument("--reps", type=int, default=3, help="profiled calls per side (default 3)")
    p.add_argument("--spread-routing", action="store_true",
                   help="weights moved from init so that tokens spread over the experts")
    p.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write the figures here")
    p.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                   help="first wait up to SECONDS for the CPU to be idle")
    args = p.parse_args(argv)
    unknown = set(args.only or ()) - set(TARGETS)
    if unknown:
        p.error(f"--only: unknown target(s) {sorted(unknown)}; choose from {list(TARGETS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.wait_idle:
        wait_for_idle(args.wait_idle)
    start = time.perf_counter()
    result = run(args)
    result["wall_s"] = time.perf_counter() - start
    print(format_result(result))
    write_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
