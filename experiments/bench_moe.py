"""MoE-layer tokens/s per dispatch strategy (dense, grouped, dropless, capacity) against
OpenMythos's PyTorch ``MoEFFN``: same shapes, same weights, same input, same run, fp32 CPU;
then the load-balance trajectory of a short training run with and without the router-bias
update.

    python experiments/bench_moe.py                       # preset default: dim 256, 16 experts
    python experiments/bench_moe.py --preset small --batch 16 --json out.json
    python experiments/bench_moe.py --only balance --bias-rate 0.02 --train-set model.n_experts=8
    python experiments/bench_moe.py --quick               # tiny preset, few steps, seconds

Both sides run the whole layer (router, top-K, routed and shared experts) on x (B, T, D)
drawn from N(0, 1): "forward" is the layer alone (jitted / ``torch.no_grad``), "fwd+bwd" adds
the gradient of sum(out**2) with respect to every weight and x. Timings are medians, the
sides taking turns in chunks. The weights come from ``torch.manual_seed(seed)`` and are
converted with ``mythos_jax.interop.openmythos.load_state_dict``; "max |diff|" is each
strategy's largest output difference from torch ("capacity" differs where it drops rows).
Routing is summarised from the torch router: busiest expert / mean load and the rows
"capacity" drops at its capacity factor.

Load balance: the ``tiny`` training preset (``mythos_jax.train``; ``BALANCE_SETTINGS``: 16
experts, top-2, two loops per step; one device) trained twice from the same initial state on
the same batches, ``optim.router_bias_rate`` 0 (no update) and ``--bias-rate``; each step's busiest
expert load over the mean (``load_max_over_mean``, summed over the loops; E/K when
collapsed, 1 when balanced). See experiments/README.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mythos_jax.bench.presets import PRESET_SHAPES, PRESETS, benchmark_config
from mythos_jax.bench.timing import (CpuMonitor, config_override_arg, interleaved, machine_info,
                                     wait_for_idle, write_json)
from mythos_jax.interop.openmythos import (config_to_torch, import_reference,
                                           load_state_dict)
from mythos_jax.modes import MoEImpl
from mythos_jax.moe.grouped_matmul import table_line
from mythos_jax.moe.slots import expert_capacity
from mythos_jax.parallel.mesh import make_mesh
from mythos_jax.train.config import load_train_config
from mythos_jax.train.data import train_iterator
from mythos_jax.train.evaluate import global_batch
from mythos_jax.train.step import build_plan, init_train_state, make_train_step

STRATEGIES = ("dense", *(impl for impl in MoEImpl.names() if impl != "dense"))   # reference first

# Load-balance runs: the "tiny" training preset with more experts (room for imbalance) and a
# fixed loop count (one static scan: the cheapest step); --train-set overrides any of it.
BALANCE_SETTINGS = ("model.n_experts=16", "model.n_experts_per_tok=2", "loops.schedule=fixed",
                    "loops.n=2", "mesh=data=1", "data.prefetch=0")
BALANCE_TABLE_STEPS = (0, 5, 10, 25, 50, 100, 150, 200, 500, 1000, 2000)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="layer config (default: "
                   "'default', dim 256, 16 experts, top-2; --quick: 'tiny')")
    p.add_argument("--batch", type=int, help="batch (preset default: 8)")
    p.add_argument("--seq", type=int, help="sequence length (preset default: 128)")
    p.add_argument("--capacity-factor", type=float, default=1.25,
                   help="capacity_factor of the 'capacity' strategy (default 1.25)")
    p.add_argument("--set", type=config_override_arg, action="append", default=[],
                   metavar="FIELD=VALUE", help="any other MythosConfig field, repeatable")
    p.add_argument("--iters", type=int, help="timed calls per side (default 10; --quick 3)")
    p.add_argument("--balance-steps", type=int,
                   help="training steps of each load-balance run (default 200; --quick 12)")
    p.add_argument("--bias-rate", type=float, default=2e-2,
                   help="optim.router_bias_rate of the run with the update (default 0.02)")
    p.add_argument("--train-set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="a training-config override of the load-balance runs, repeatable")
    p.add_argument("--only", choices=("speed", "balance"),
                   help="run only the tokens/s part or only the load-balance part")
    p.add_argument("--quick", action="store_true",
                   help="tiny preset, few calls and steps (smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write all figures and the config here")
    p.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                   help="first wait up to SECONDS for other processes to leave the CPU idle")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return p.parse_args(argv)


# ============================================================================ the two layers
def torch_side(moe, x_np: np.ndarray):
    """(forward, fwd+bwd) callables of OpenMythos's MoEFFN on x, and its output."""
    import torch

    x = torch.from_numpy(x_np)

    def forward():
        with torch.no_grad():
            return moe(x)

    def forward_backward():
        moe.zero_grad(set_to_none=True)
        x_grad = x.clone().requires_grad_(True)
        (moe(x_grad) ** 2).sum().backward()

    return forward, forward_backward, forward().numpy()


def jax_side(moe, x_np: np.ndarray) -> dict:
    """A mythos-jax MoE layer on x: ``forward`` and ``fwd+bwd`` callables, ``compile_s``, its
    output ``out`` and the compiled forward+backward's HLO text ``hlo``."""
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)
    x = jnp.asarray(x_np)

    def apply(params, x):
        out, _router_stats = nnx.merge(graphdef, params, rest)(x)
        return out

    def loss(params, x):
        return jnp.sum(apply(params, x) ** 2)

    start = time.perf_counter()
    forward = jax.jit(apply).lower(params, x).compile()
    forward_backward = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
    compile_s = time.perf_counter() - start
    return {"forward": lambda: forward(params, x).block_until_ready(),
            "fwd+bwd": lambda: jax.block_until_ready(forward_backward(params, x)),
            "compile_s": compile_s, "out": np.asarray(forward(params, x)),
            "hlo": forward_backward.as_text()}


def routing_summary(torch_moe, x_np: np.ndarray, k: int, capacity_factor: float) -> dict:
    """Busiest expert's load over the mean, and the rows 'capacity' drops (any priority
    order drops sum(max(load - C, 0)) rows)."""
    import torch

    with torch.no_grad():
        logits = torch_moe.router(torch.from_numpy(x_np).reshape(-1, x_np.shape[-1]))
        _, ids = (logits + torch_moe.router_bias).topk(k, dim=-1)
    n_experts = logits.shape[-1]
    loads = np.bincount(ids.numpy().reshape(-1), minlength=n_experts)
    capacity = expert_capacity(logits.shape[0], k, n_experts, capacity_factor)
    return {"loads": loads.tolist(), "max_load_ratio": float(loads.max() / loads.mean()),
            "capacity": capacity, "capacity_dropped": int(np.maximum(loads - capacity, 0).sum()),
            "rows": int(loads.sum())}


def moe_setup(args) -> dict:
    """The speed run's shapes, OpenMythos's MoEFFN (``torch_moe``, from
    ``torch.manual_seed(args.seed)``), its model's ``state_dict`` and the input x (B, T, D)."""
    import torch

    preset = args.preset or ("tiny" if args.quick else "default")
    batch = args.batch or PRESET_SHAPES[preset]["batch"]
    seq_len = args.seq or PRESET_SHAPES[preset]["seq_len"]
    cfg = benchmark_config(preset, dict(args.set, capacity_factor=args.capacity_factor),
                           seq_len=seq_len)
    torch.manual_seed(args.seed)
    torch_model = import_reference().OpenMythos(config_to_torch(cfg))
    x = np.random.default_rng(args.seed).standard_normal((batch, seq_len, cfg.dim),
                                                         dtype=np.float32)
    return {"preset": preset, "batch": batch, "seq_len": seq_len, "config": cfg,
            "torch_moe": torch_model.recurrent.block.ffn,            # open_mythos MoEFFN
            "state_dict": torch_model.state_dict(), "x": x, "seed": args.seed}


def jax_moe(setup: dict, impl: str | None = None):
    """The mythos-jax MoE layer with the setup's weights (``impl``: its dispatch, default the
    config's)."""
    cfg = setup["config"] if impl is None else setup["config"].replace(moe_impl=impl)
    return load_state_dict(cfg, setup["state_dict"], seed=setup["seed"]).recurrent.block.ffn


def speed_run(args, log) -> dict:
    """Tokens/s of every strategy and of OpenMythos's MoEFFN, and the routing summary."""
    setup = moe_setup(args)
    cfg, x, batch, seq_len = setup["config"], setup["x"], setup["batch"], setup["seq_len"]
    iters = args.iters or (3 if args.quick else 10)
    torch_fwd, torch_bwd, torch_out = torch_side(setup["torch_moe"], x)
    forward, backward = {"openmythos": torch_fwd}, {"openmythos": torch_bwd}
    rows = {"openmythos": {}}
    for impl in STRATEGIES:
        log(f"compiling {impl}")
        side = jax_side(jax_moe(setup, impl), x)
        forward[impl], backward[impl] = side["forward"], side["fwd+bwd"]
        rows[impl] = {"compile_s": side["compile_s"],
                      "max_abs_diff_vs_torch": float(np.max(np.abs(side["out"] - torch_out)))}
    monitor = CpuMonitor()
    for name, fns in (("forward", forward), ("fwd+bwd", backward)):
        log(f"timing {name}: {iters} calls per side")
        for side, times in interleaved(fns, iters, warmup=1, rounds=4).items():
            median_s = statistics.median(times)
            rows[side][name] = {"median_s": median_s, "tokens_per_s": batch * seq_len / median_s}
    for side in rows:
        for name in ("forward", "fwd+bwd"):
            rows[side][name]["vs_torch"] = (rows[side][name]["tokens_per_s"]
                                            / rows["openmythos"][name]["tokens_per_s"])
    return {"preset": setup["preset"], "config": cfg.to_dict(), "batch": batch,
            "seq_len": seq_len, "iters": iters, "strategies": rows,
            "routing": routing_summary(setup["torch_moe"], x, cfg.n_experts_per_tok,
                                       args.capacity_factor),
            "contention": monitor.other_share()}


# ============================================================================ load balance
def balance_config(args, rate: float):
    """The training config of one load-balance run: ``BALANCE_SETTINGS`` and ``--train-set``
    over the "tiny" preset, with this router-bias rate."""
    steps = args.balance_steps or (12 if args.quick else 200)
    return load_train_config("tiny", [f"steps={steps}", f"seed={args.seed}",
                                      f"data.seed={args.seed}", *BALANCE_SETTINGS,
                                      f"optim.router_bias_rate={rate}", *args.train_set])


def load_trajectory(plan, initial) -> dict:
    """Train ``plan.cfg.steps`` steps from a copy of ``initial``: each step's max/mean expert
    load, and the last step's per-expert load and cross-entropy."""
    step = make_train_step(plan)
    state = jax.tree.map(lambda x: x.copy(), initial)            # the step donates its state
    batches = train_iterator(plan.cfg.data)
    ratios = []
    for _ in range(plan.cfg.steps):
        state, metrics = step(state, global_batch(plan, next(batches)))
        ratios.append(float(metrics["load_max_over_mean"]))
    return {"rate": plan.cfg.optim.router_bias_rate, "max_over_mean": ratios,
            "final_load": np.asarray(metrics["expert_load"]).tolist(),
            "final_ce": float(metrics["ce"])}


def balance_run(args, log) -> dict:
    """The same training run without ("no_update") and with ("bias_update") the router-bias
    update: same initial state, same batches."""
    started = time.perf_counter()
    configs = {name: balance_config(args, rate)
               for name, rate in (("no_update", 0.0), ("bias_update", args.bias_rate))}
    cfg = configs["bias_update"]
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    plans = {name: build_plan(c, mesh) for name, c in configs.items()}
    initial = init_train_state(plans["no_update"])
    runs = {}
    for name, plan in plans.items():
        log(f"load balance, {name}: {cfg.steps} training steps at router_bias_rate "
            f"{plan.cfg.optim.router_bias_rate:g}")
        runs[name] = load_trajectory(plan, initial)
    model_cfg = plans["bias_update"].model_cfg
    return {"train_config": cfg.to_dict(), "dim": model_cfg.dim,
            "n_experts": model_cfg.n_experts, "top_k": model_cfg.n_experts_per_tok,
            "steps": cfg.steps, "runs": runs, "wall_s": time.perf_counter() - started}


def run(args, log) -> dict:
    """The parts asked for (``--only``): the tokens/s figures at the top level, the
    load-balance runs under "load_balance"."""
    started = time.perf_counter()
    result = {} if args.only == "balance" else speed_run(args, log)
    if args.only != "speed":
        result["load_balance"] = balance_run(args, log)
    return {**result, "quick": args.quick, "machine": machine_info(),
            "wall_s": time.perf_counter() - started}


def format_table(result: dict) -> str:
    """The tokens/s table."""
    cfg, routing, m = result["config"], result["routing"], result["machine"]
    header = [
        f"MoE layer [{result['preset']}]: dim={cfg['dim']} experts={cfg['n_experts']} "
        f"top-{cfg['n_experts_per_tok']} expert_dim={cfg['expert_dim']} "
        f"shared={cfg['n_shared_experts']}; {result['batch']} x {result['seq_len']} tokens; "
        f"fp32 on {m['cpu']}, {m['cpu_count']} cores, torch threads {m['torch_threads']}",
        f"routing (torch router, this input): busiest expert {routing['max_load_ratio']:.2f}x "
        f"the mean load; capacity_factor {cfg['capacity_factor']} -> {routing['capacity']} "
        f"rows/expert, {routing['capacity_dropped']} of {routing['rows']} rows dropped",
        table_line(),
    ]
    if result["contention"] is not None and result["contention"] > 0.10:
        header.append(f"WARNING: other processes used {100 * result['contention']:.0f}% of "
                      "the CPU while timing; rerun on an idle machine")
    cols = ("strategy", "fwd tok/s", "fwd vs torch", "fwd+bwd tok/s", "fwd+bwd vs torch",
            "compile s", "max |diff|")
    table = [cols]
    for side, r in result["strategies"].items():
        fwd, bwd = r["forward"], r["fwd+bwd"]
        table.append((side, f"{fwd['tokens_per_s']:,.0f}", f"{fwd['vs_torch']:.2f}x",
                      f"{bwd['tokens_per_s']:,.0f}", f"{bwd['vs_torch']:.2f}x",
                      f"{r['compile_s']:.1f}" if "compile_s" in r else "-",
                      f"{r['max_abs_diff_vs_torch']:.1e}" if "compile_s" in r else "-"))
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                       enumerate(zip(row, widths))) for row in table]
    rule = "-" * len(lines[0])
    return "\n".join(header + [rule, lines[0], rule, *lines[1:], rule])


def format_balance(balance: dict) -> str:
    """max/mean expert load at a few steps of both runs and its mean over the last tenth of
    the steps, then each run's last per-expert load."""
    runs, steps = balance["runs"], balance["steps"]
    tail = max(1, steps // 10)
    names = {name: "no update" if not r["rate"] else f"bias rate {r['rate']:g}"
             for name, r in runs.items()}
    rows = [(f"step {s}", [r["max_over_mean"][s] for r in runs.values()])
            for s in sorted({s for s in BALANCE_TABLE_STEPS if s < steps} | {steps - 1})]
    rows.append((f"mean of steps {steps - tail}-{steps - 1}",
                 [statistics.mean(r["max_over_mean"][-tail:]) for r in runs.values()]))
    width = len(rows[-1][0])
    lines = [f"load balance: 'tiny' training preset, {balance['n_experts']} experts top-"
             f"{balance['top_k']}, dim {balance['dim']}; busiest expert load / mean per "
             f"step (collapsed {balance['n_experts'] / balance['top_k']:g}, balanced 1)",
             " " * width + "".join(f"{n:>16}" for n in names.values())]
    lines += [label.ljust(width) + "".join(f"{x:>16.2f}" for x in values)
              for label, values in rows]
    lines += [f"last step's load, {names[name]}: {[round(x) for x in r['final_load']]} "
              f"(ce {r['final_ce']:.3f})" for name, r in runs.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    log = (lambda msg: None) if args.quiet else (
        lambda msg: print(f"[bench_moe] {msg}", file=sys.stderr, flush=True))
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle, log=log)
    result = run(args, log)
    if "strategies" in result:
        print(format_table(result))
    if "load_balance" in result:
        print(format_balance(result["load_balance"]))
    print(f"(wall time {result['wall_s']:.0f} s)")
    write_json(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
