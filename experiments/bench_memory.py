"""Compiled temp memory of the loop drivers against the loop count (nothing is run).

    python experiments/bench_memory.py                     # dim 256, batch 8 x seq 128
    python experiments/bench_memory.py --quick             # tiny config, seconds
    python experiments/bench_memory.py --loops 4 16 64 --batch 4 --seq 256 --json out.json
    python experiments/bench_memory.py --preset small --set loop_remat=full

Every figure is ``memory_analysis().temp_size_in_bytes`` of ``jax.jit(f).lower(...).compile()``:
what XLA's buffer assignment reserves for intermediates (parameters, inputs and outputs not
included). It is deterministic for a given program and JAX/XLA version. Rows:

  inference, static scan         model(ids, n), one program per n
  inference, run-time count      model(ids, <traced int32>): one while-loop program
  train bd=4, Fixed(n)           grad of the loss, counts from schedules.Fixed(n, backprop_depth=4)
                                 drawn inside the step (n is a constant of the program)
  train bd=4, run-time count     the same with the count an argument: one program
  train full, remat=R            grad with max_loops=n (full backprop, count traced), for
                                 cfg.loop_remat R in "full", "dots", "none"

"growth/loop" is (temp[n_max] - temp[n_min]) / (n_max - n_min); the bound it is printed
against is one hidden state, B*T*dim*4 bytes. See experiments/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from mythos_jax import OpenMythos
from mythos_jax.bench.presets import PRESETS, benchmark_config
from mythos_jax.bench.timing import config_override_arg, write_json
from mythos_jax.loops import LoopSpec
from mythos_jax.schedules import Fixed

REMATS = ("full", "dots", "none")
# LLVM at -O0 halves the compile time. Buffer assignment (every figure here) is done on the
# HLO before LLVM runs, so the bytes are those of the default program; each run re-checks
# this on one program (--default-codegen compiles everything with XLA's defaults instead).
FAST_CODEGEN = {"xla_backend_optimization_level": 0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model config (default: 'default', dim 256, 16 experts; --quick: "
                        "'tiny')")
    p.add_argument("--batch", type=int, help="batch size (default 8; --quick 2)")
    p.add_argument("--seq", type=int, help="sequence length (default 128; --quick 16)")
    p.add_argument("--loops", type=int, nargs="+",
                   help="loop counts (default 4 8 16 32 64; --quick 4 8)")
    p.add_argument("--backprop-depth", type=int, default=4,
                   help="k of the truncated-backprop rows (default 4)")
    p.add_argument("--set", type=config_override_arg, action="append", default=[],
                   metavar="FIELD=VALUE",
                   help="any MythosConfig field, repeatable (act_threshold is 1e9 unless set)")
    p.add_argument("--quick", action="store_true", help="tiny config and shapes (seconds)")
    p.add_argument("--default-codegen", action="store_true",
                   help="compile with XLA's default LLVM level (slower, same figures)")
    p.add_argument("--json", metavar="PATH", help="write every figure and the config here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ programs
class Bench:
    """The model pieces, a batch, and compiled-temp-bytes of each program."""

    def __init__(self, cfg, batch: int, seq_len: int, options: dict, log):
        self.cfg, self.batch, self.seq_len, self.options, self.log = (cfg, batch, seq_len,
                                                                      options, log)
        self.ids = jax.random.randint(jax.random.key(0), (batch, seq_len), 0, cfg.vocab_size)
        self.targets = jax.random.randint(jax.random.key(1), (batch, seq_len), 0,
                                          cfg.vocab_size)
        self._models: dict[str, tuple] = {}
        self.compile_s = 0.0

    def model(self, remat: str | None = None):
        """(graphdef, params, rest) of the model with ``loop_remat=remat`` (cfg's if None)."""
        remat = remat or self.cfg.loop_remat
        if remat not in self._models:
            model = OpenMythos(self.cfg.replace(loop_remat=remat), rngs=nnx.Rngs(0))
            self._models[remat] = nnx.split(model, nnx.Param, ...)
        return self._models[remat]

    def temp_bytes(self, fn, *args, options=None) -> int:
        start = time.perf_counter()
        compiled = jax.jit(fn, compiler_options=self.options if options is None else options
                           ).lower(*args).compile()
        self.compile_s += time.perf_counter() - start
        return int(compiled.memory_analysis().temp_size_in_bytes)

    def loss_fn(self, remat: str | None = None, **loop_kwargs):
        graphdef, _, rest = self.model(remat)

        def loss(params, ids, targets, n_loops):
            logits = nnx.merge(graphdef, params, rest)(ids, LoopSpec(n_loops, **loop_kwargs))
            log_p = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(log_p, targets[..., None], axis=-1))
        return loss

    # One function per row; each returns the temp bytes of its program for count n.
    def inference_static(self, n: int) -> int:
        graphdef, params, rest = self.model()
        return self.temp_bytes(lambda p, i: nnx.merge(graphdef, p, rest)(i, n),
                               params, self.ids)

    def inference_run_time(self) -> int:
        graphdef, params, rest = self.model()
        return self.temp_bytes(lambda p, i, n: nnx.merge(graphdef, p, rest)(i, n),
                               params, self.ids, jnp.int32(1))

    def train_fixed(self, n: int, depth: int, options=None) -> int:
        schedule = Fixed(n, backprop_depth=depth, max_loops=max(n, depth))
        loss = self.loss_fn(backprop_depth=depth, max_loops=schedule.max_loops)

        def step(params, ids, targets, key):
            counts = schedule.sample(0, key, ids.shape[0])
            return jax.value_and_grad(loss)(params, ids, targets, counts)
        return self.temp_bytes(step, self.model()[1], self.ids, self.targets,
                               jax.random.key(2), options=options)

    def train_run_time(self, depth: int) -> int:
        return self.temp_bytes(jax.value_and_grad(self.loss_fn(backprop_depth=depth)),
                               self.model()[1], self.ids, self.targets, jnp.int32(1))

    def train_full(self, n: int, remat: str) -> int:
        return self.temp_bytes(jax.value_and_grad(self.loss_fn(remat, max_loops=n)),
                               self.model(remat)[1], self.ids, self.targets, jnp.int32(1))


def growth_per_loop(temps: dict[int, int]) -> float:
    lo, hi = min(temps), max(temps)
    return (temps[hi] - temps[lo]) / (hi - lo) if hi > lo else 0.0


def run(args) -> dict:
    preset = args.preset or ("tiny" if args.quick else "default")
    batch = args.batch or (2 if args.quick else 8)
    seq_len = args.seq or (16 if args.quick else 128)
    counts = sorted(set(args.loops or ((4, 8) if args.quick else (4, 8, 16, 32, 64))))
    depth = args.backprop_depth
    cfg = benchmark_config(preset, dict(args.set), seq_len=seq_len)
    log = (lambda msg: None) if args.quiet else (
        lambda msg: print(f"[bench_memory] {msg}", file=sys.stderr, flush=True))
    bench = Bench(cfg, batch, seq_len, {} if args.default_codegen else FAST_CODEGEN, log)
    start = time.perf_counter()

    rows: list[dict] = []

    def add(name: str, measure, one_program=False, note=""):
        log(f"{name} ...")
        if one_program:
            value = measure()
            temps = {n: value for n in counts}
        else:
            temps = {n: measure(n) for n in counts}
        rows.append(dict(name=name, one_program=one_program, note=note,
                         temp_bytes={str(n): b for n, b in temps.items()},
                         growth_per_loop_bytes=growth_per_loop(temps),
                         ratio_max_over_min=temps[counts[-1]] / temps[counts[0]]))

    add("inference, static scan", bench.inference_static)
    add("inference, run-time count", bench.inference_run_time, one_program=True,
        note="while loop, one program for every count")
    add(f"train bd={depth}, Fixed(n)", lambda n: bench.train_fixed(n, depth),
        note=f"schedules.Fixed(n, backprop_depth={depth})")
    add(f"train bd={depth}, run-time count", lambda: bench.train_run_time(depth),
        one_program=True, note="count an argument, one program")
    for remat in REMATS:
        add(f"train full, remat={remat}", lambda n, r=remat: bench.train_full(n, r),
            note=f"max_loops=n, loop_remat={remat!r}")

    codegen_check = None
    if not args.default_codegen:
        log("codegen check: one program at XLA's default LLVM level ...")
        fast = next(r for r in rows if r["name"].startswith("train bd="))
        default = bench.train_fixed(counts[0], depth, options={})
        codegen_check = dict(program=f"{fast['name']} at n={counts[0]}",
                             fast_bytes=fast["temp_bytes"][str(counts[0])],
                             default_bytes=default,
                             equal=default == fast["temp_bytes"][str(counts[0])])

    hidden = batch * seq_len * cfg.dim * 4
    return dict(
        config=dataclasses.asdict(cfg), preset=preset, batch=batch, seq_len=seq_len,
        loops=counts, backprop_depth=depth, hidden_state_bytes=hidden,
        act_bookkeeping_bytes_per_loop=3 * batch * seq_len * 4,
        rows=rows, codegen=("xla default" if args.default_codegen else FAST_CODEGEN),
        codegen_check=codegen_check, compile_s=bench.compile_s,
        wall_s=time.perf_counter() - start,
        machine=dict(platform=platform.platform(), python=platform.python_version(),
                     jax=jax.__version__, backend=jax.default_backend(),
                     cpus=os.cpu_count()))


def format_table(result: dict) -> str:
    counts, hidden = result["loops"], result["hidden_state_bytes"]
    cfg = result["config"]
    mib = 2.0 ** 20
    lines = [
        f"config [{result['preset']}]: {cfg['attn_type']} dim={cfg['dim']} "
        f"experts={cfg['n_experts']} top-{cfg['n_experts_per_tok']} vocab={cfg['vocab_size']} "
        f"prelude/coda={cfg['prelude_layers']}/{cfg['coda_layers']} "
        f"moe_impl={cfg['moe_impl']}; batch {result['batch']} x seq {result['seq_len']}",
        f"compiled temp memory (MiB) vs loop count; one hidden state B*T*dim*4 = "
        f"{hidden / 1024:.0f} KiB (the bound on growth/loop of full backprop with "
        f"remat=full, plus the (B, T) ACT bookkeeping, {result['act_bookkeeping_bytes_per_loop']}"
        f" B)",
    ]
    name_w = max(len(r["name"]) for r in result["rows"]) + 2
    header = (f"{'':<{name_w}}" + "".join(f"{n:>10}" for n in counts)
              + f"{'max/min':>9}{'growth/loop':>14}{'/ hidden':>10}")
    rule = "-" * len(header)
    lines += [rule, header, rule]
    for row in result["rows"]:
        temps = [row["temp_bytes"][str(n)] for n in counts]
        growth = row["growth_per_loop_bytes"]
        cells = "".join(f"{t / mib:>10.2f}" for t in temps)
        lines.append(f"{row['name']:<{name_w}}{cells}{row['ratio_max_over_min']:>8.3f}x"
                     f"{growth / 1024:>10.1f} KiB{growth / hidden:>9.2f}x")
    lines.append(rule)
    check = result["codegen_check"]
    if check:
        lines.append(f"codegen: LLVM -O0 for speed; {check['program']}: "
                     f"{check['fast_bytes']} B at -O0, {check['default_bytes']} B with XLA's "
                     f"defaults ({'equal' if check['equal'] else 'DIFFERENT'})")
    lines.append(f"jax {result['machine']['jax']} ({result['machine']['backend']}), "
                 f"compile {result['compile_s']:.0f} s, wall {result['wall_s']:.0f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(format_table(result))
    write_json(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
