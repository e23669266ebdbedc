"""One-shot check of a GPU or TPU machine: the kernels' tests, every attention and MoE
implementation against the XLA reference, their speed, and a bf16 training step's MFU.

    python experiments/device_check.py                      # on the GPU/TPU JAX finds, < 8 min
    python experiments/device_check.py --dry-run            # the whole plan, tiny, on CPU
    python experiments/device_check.py --json out.json      # default results/device_check.json

Steps, in this order (each writes its rows to the JSON; a step due past ``--budget-s`` is
skipped and says so, flash_speed stops between rows, so the run ends in time):
  kernel_tests  pytest of the kernel test files on the device (JAX_PLATFORMS set to it);
                the dry run lists the command and does not run it
  attention     max |error| vs the fp32 reference of out, left-padded out and the gradients,
                fp32 and bf16, per implementation: xla, pallas (ours: Triton on GPU, Mosaic on
                TPU, interpreted on CPU), tokamax (``tokamax=True``; "via" says what ran)
  moe           the grouped matmuls of the dropless MoE (SwiGLU over sorted rows, mythos_1b
                expert dims, bf16): error vs fp32 ``lax.ragged_dot`` and TFLOP/s fwd, fwd+bwd
  train_step    a bf16 training step at a mythos_1b-like config (4 fixed loops,
                moe_impl="dropless", attention_impl="auto"): seconds and MFU
  decode_speed  latent decode bandwidth vs the HBM peak (``bench_attention``)
  flash_speed   TFLOP/s fwd and fwd+bwd, bf16, causal, seq 2048/4096/8192 x 16k tokens,
                16 heads, MLA dims of mythos_1b and DeepSeek-V3, per implementation
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mythos_jax.bench.timing import write_json
from mythos_jax.chips import chip
from mythos_jax.flop_count import train_flops_per_token
from mythos_jax.kernels import kernel_target, mla_flash_attention, mla_flash_reference
from mythos_jax.kernels import dispatch, tokamax_attention
from mythos_jax.modes import GroupedMatmul
from mythos_jax.moe import grouped_matmul as gm
from mythos_jax.moe.expert_ffn import ragged_swiglu

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_TESTS = ["tests/test_kernels_mla_flash.py", "tests/test_kernels_mla_decode.py",
                "tests/test_kernels_model.py", "tests/test_tokamax.py"]
ATTENTION_IMPLS = ("xla", "pallas", "tokamax")


def sibling(name: str):
    """The module ``experiments/<name>.py`` (the experiments are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = sibling("bench_attention")


class Sizes(NamedTuple):
    """Shapes of every step: the device run's, or the dry run's tiny ones."""
    error_shape: tuple = (2, 4, 256)          # batch, heads, seq
    error_dtypes: tuple = (jnp.float32, jnp.bfloat16)
    flash_dims: tuple = ("mythos_1b", "deepseek_v3")
    flash_seqs: tuple = (2048, 4096, 8192)
    flash_tokens_heads: tuple = (16384, 16)
    moe_rows_experts: tuple = (32768, 64)     # rows = tokens x top-k, experts
    moe_dims: tuple = (2048, 2048)            # model dim, expert hidden dim
    train: tuple = ("mythos_1b", 2048, 8, 4)  # variant, seq_len, batch, loops
    iters: int = 5


DRY_RUN = Sizes(error_shape=(2, 2, 24), error_dtypes=(jnp.bfloat16,), flash_dims=("tiny",),
                flash_seqs=(32,), flash_tokens_heads=(64, 2), moe_rows_experts=(48, 4),
                moe_dims=(16, 24), train=("tiny_mla", 32, 2, 2), iters=1)
DIMS = {**bench.FLASH_DIMS, "tiny": (16, 8, 16)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes; kernel tests not run")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="no step starts after this many seconds (default 420)")
    p.add_argument("--json", default=os.path.join(HERE, "results", "device_check.json"))
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ attention
def attention(impl: str, scale: float):
    """impl -> fn(q_nope, q_rope, k_nope, k_rope, v, kv_start) -> (B, H, T, v_dim)."""
    if impl == "xla":
        return lambda *a: mla_flash_reference(*a, scale=scale)
    return lambda *a: mla_flash_attention(*a, scale=scale, tokamax=impl == "tokamax")


def tokamax_via(dtype, dims) -> str:
    """What ``tokamax=True`` runs here: the tokamax implementation or our kernels' reason."""
    platform, kind = dispatch.mesh_platform(), dispatch.mesh_device_kind()
    head_dims = {"qk": dims[0] + dims[1], "v": dims[2]}
    reason = tokamax_attention.unsupported_reason(platform, kind, dtype, head_dims)
    return (f"ours ({reason})" if reason
            else f"tokamax {tokamax_attention.implementation(platform, kind)[0]}")


def attention_rows(sizes: Sizes) -> list[dict]:
    batch, heads, length = sizes.error_shape
    starts = jnp.asarray([0, length // 3], jnp.int32)
    causal = jnp.zeros((batch,), jnp.int32)
    rows = []
    for name in dict.fromkeys(sizes.flash_dims[:1] + sizes.flash_dims[-1:]):   # first, last
        dims = DIMS[name]
        scale = (dims[0] + dims[1]) ** -0.5

        def everything(fn):
            grads = bench.forward_backward(lambda *a: fn(*a, causal))
            return jax.jit(lambda *a: [fn(*a[:5], causal), fn(*a[:5], starts), *grads(*a)])
        for dtype in sizes.error_dtypes:
            arrays = bench.flash_inputs(batch, heads, length, dims, dtype)
            exact = everything(attention("xla", scale))(*[x.astype(jnp.float32) for x in arrays])
            for impl in ATTENTION_IMPLS:
                got = everything(attention(impl, scale))(*arrays)
                errors = [bench.max_error(g, e) for g, e in zip(got, exact)]
                rows.append(dict(dims=name, dtype=jnp.dtype(dtype).name, impl=impl,
                                 via=tokamax_via(dtype, dims) if impl == "tokamax" else impl,
                                 out=errors[0], left_padded=errors[1], worst_grad=max(errors[2:])))
    return rows


def flash_speed_rows(sizes: Sizes, deadline: float) -> list[dict]:
    tokens, heads = sizes.flash_tokens_heads
    rows = []
    for name in sizes.flash_dims:
        dims = DIMS[name]
        dqk, dv = dims[0] + dims[1], dims[2]
        for length in sizes.flash_seqs:
            batch = max(1, tokens // length)
            arrays = bench.flash_inputs(batch, heads, length, dims, jnp.bfloat16)
            pairs = batch * heads * length * length / 2
            flops = {"fwd": 2 * pairs * (dqk + dv), "fwd+bwd": 2 * pairs * (4 * dqk + 3 * dv)}
            causal = jnp.zeros((batch,), jnp.int32)
            for impl in ATTENTION_IMPLS:
                row = dict(dims=name, batch=batch, seq=length, impl=impl)
                rows.append(row)
                if time.perf_counter() > deadline:
                    row["error"] = "skipped: time budget"
                    continue
                fn = lambda *a, f=attention(impl, dqk ** -0.5): f(*a, causal)  # noqa: E731
                try:
                    seconds = {"fwd": bench.median_seconds(fn, arrays[:5], sizes.iters),
                               "fwd+bwd": bench.median_seconds(bench.forward_backward(fn),
                                                               arrays, sizes.iters)}
                    row.update({f"{p}_tflops": flops[p] / seconds[p] / 1e12 for p in flops})
                except Exception as error:   # e.g. the XLA reference out of memory
                    row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
    return rows


# ------------------------------------------------------------------------------ MoE
def seconds_and_output(fn, args, iters: int):
    """(median seconds of ``iters`` calls of jitted ``fn`` after one warm-up, its output)."""
    compiled = jax.jit(fn).lower(*args).compile()
    out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        started = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - started)
    return float(np.median(times)), out


def moe_rows(sizes: Sizes) -> list[dict]:
    (n_rows, experts), (dim, hidden) = sizes.moe_rows_experts, sizes.moe_dims
    keys = jax.random.split(jax.random.key(0), 4)
    rows_in = jax.random.normal(keys[0], (n_rows, dim), jnp.float32)
    kernels = [jax.random.normal(k, shape, jnp.float32) / np.sqrt(shape[1]) for k, shape in
               zip(keys[1:], [(experts, dim, hidden)] * 2 + [(experts, hidden, dim)])]
    group_sizes = jnp.full((experts,), n_rows // experts, jnp.int32)
    exact = ragged_swiglu(rows_in, group_sizes, *kernels, grouped_matmul="ragged_dot")
    bf16 = [x.astype(jnp.bfloat16) for x in (rows_in, *kernels)]
    flops = 3 * 2 * (n_rows // experts * experts) * dim * hidden
    choices = [GroupedMatmul.RAGGED_DOT, GroupedMatmul.TOKAMAX]
    if dispatch.mesh_platform() in ("tpu", "cpu"):
        choices.append(GroupedMatmul.MEGABLOX)       # interpreted on CPU
    out = []
    for choice in choices:
        def forward(x, gate, up, down, choice=choice):
            return ragged_swiglu(x, group_sizes, gate, up, down, grouped_matmul=choice)

        def forward_backward(*args, forward=forward):
            return jax.grad(lambda *a: jnp.sum(forward(*a).astype(jnp.float32)),
                            argnums=(0, 1, 2, 3))(*args)
        row = dict(choice=str(choice), runs=str(gm.resolve(choice, jnp.bfloat16)),
                   rows=n_rows, experts=experts, dim=dim, hidden=hidden)
        try:
            fwd, got = seconds_and_output(forward, bf16, sizes.iters)
            row["error"] = bench.max_error(got, exact)
            both = seconds_and_output(forward_backward, bf16, sizes.iters)[0]
            row.update(fwd_tflops=flops / fwd / 1e12, fwd_bwd_tflops=3 * flops / both / 1e12)
        except Exception as error:
            row["failure"] = f"{type(error).__name__}: {str(error)[:200]}"
        out.append(row)
    return out


# ------------------------------------------------------------------------------ training
def train_step_row(sizes: Sizes) -> dict:
    from mythos_jax.parallel.mesh import make_mesh
    from mythos_jax.train.config import load_train_config
    from mythos_jax.train.data import train_iterator
    from mythos_jax.train.evaluate import global_batch
    from mythos_jax.train.step import build_plan, init_train_state, make_train_step

    variant, seq_len, batch, loops = sizes.train
    cfg = load_train_config("tiny", [
        f"model.variant={variant}", "model.dtype=bfloat16", "model.moe_impl=dropless",
        f"model.max_seq_len={seq_len}", f"data.seq_len={seq_len}", f"data.batch_size={batch}",
        "loops.schedule=fixed", f"loops.n={loops}", f"loops.max_loops={loops}", "mesh=data=-1"])
    plan = build_plan(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    state, step = init_train_state(plan), make_train_step(plan)
    batches = train_iterator(cfg.data)
    started = time.perf_counter()
    state, metrics = step(state, global_batch(plan, next(batches)))
    jax.block_until_ready(metrics)
    compile_s, times = time.perf_counter() - started, []
    for _ in range(max(2, sizes.iters)):
        data = global_batch(plan, next(batches))
        started = time.perf_counter()
        state, metrics = step(state, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - started)
    seconds = float(np.median(times))
    figures = chip(jax.devices()[0].device_kind)
    achieved = train_flops_per_token(plan.model_cfg, seq_len, loops) * batch * seq_len / seconds
    return dict(variant=variant, seq=seq_len, batch=batch, loops=loops, first_step_s=compile_s,
                step_s=seconds, tflops=achieved / 1e12, loss=float(metrics["ce"]),
                mfu=None if figures is None else achieved / figures.peak_bf16_flops,
                attention_impl=dispatch.resolve_attention_impl(plan.model_cfg.attention_impl),
                grouped_matmul=str(gm.resolve("auto", jnp.bfloat16)))


# ------------------------------------------------------------------------------ plan
def kernel_tests(dry_run: bool, platform: str) -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-x", *KERNEL_TESTS]
    if dry_run:
        return dict(command=" ".join(command), ran=False)
    env = dict(os.environ, JAX_PLATFORMS="cuda" if platform == "gpu" else platform)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=os.path.dirname(HERE), env=env, capture_output=True,
                          text=True, timeout=150)
    return dict(command=" ".join(command), ran=True, returncode=done.returncode,
                s=time.perf_counter() - started, tail=done.stdout[-1500:])


def run(args) -> dict:
    sizes = DRY_RUN if args.dry_run else Sizes()
    start = time.perf_counter()
    deadline = start + args.budget_s
    device = jax.devices()[0]
    platform = dispatch.mesh_platform()
    figures = chip(device.device_kind)
    result = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  device=device.device_kind, platform=platform, jax=jax.__version__,
                  dry_run=args.dry_run, kernel_target=list(kernel_target()),
                  attention_auto=dispatch.resolve_attention_impl("auto"),
                  grouped_matmul_auto=str(gm.resolve("auto", jnp.bfloat16)), skipped=[])
    # Most important first; flash_speed last: it stops between rows at the deadline.
    steps = [("kernel_tests", lambda: kernel_tests(args.dry_run, platform)),
             ("attention", lambda: attention_rows(sizes)),
             ("moe", lambda: moe_rows(sizes)),
             ("train_step", lambda: train_step_row(sizes)),
             ("decode_speed", lambda: bench.decode_speed_rows(
                 args.dry_run, sizes.iters, kernel_target(),
                 None if figures is None else figures.hbm_bytes_per_s)),
             ("flash_speed", lambda: flash_speed_rows(sizes, deadline))]
    for name, step in steps:
        if time.perf_counter() > deadline:
            result["skipped"].append(name)
            continue
        print(f"[device_check] {name} at {time.perf_counter() - start:.0f} s "
              f"(cpu {time.process_time():.0f} s)", file=sys.stderr)
        try:
            result[name] = step()
        except Exception as error:       # one broken step must not hide the others
            result[name] = dict(failure=f"{type(error).__name__}: {str(error)[:300]}")
    result["wall_s"] = time.perf_counter() - start
    return result


def format_table(r: dict) -> str:
    lines = [f"device check {r['date']}: {r['device']} ({r['platform']}), jax {r['jax']}"
             + (" [dry run: tiny sizes, times mean nothing]" if r["dry_run"] else ""),
             f"auto: attention {r['attention_auto']}, grouped matmul {r['grouped_matmul_auto']}"]
    for name in ("attention", "flash_speed", "decode_speed", "moe"):
        if isinstance(r.get(name), dict):
            lines.append(f"{name}: {r[name]['failure']}")
    tests = r.get("kernel_tests", {})
    lines.append("kernel tests: " + ("not run (dry run)" if not tests.get("ran") else
                                     f"exit {tests.get('returncode')} in {tests.get('s', 0):.0f} s"
                                     if "failure" not in tests else tests["failure"]))
    lines.append(f"{'attention':<13}{'dtype':<10}{'impl':<9}{'out':>10}{'left-pad':>10}"
                 f"{'grad':>10}  via")
    for row in _rows(r, "attention"):
        lines.append(f"{row['dims']:<13}{row['dtype']:<10}{row['impl']:<9}{row['out']:>10.2e}"
                     f"{row['left_padded']:>10.2e}{row['worst_grad']:>10.2e}  {row['via']}")
    lines.append(f"flash bf16 TFLOP/s {'B x T':>11}{'impl':>9}{'fwd':>9}{'fwd+bwd':>9}")
    for row in _rows(r, "flash_speed"):
        cells = (f"{row['fwd_tflops']:>9.1f}{row['fwd+bwd_tflops']:>9.1f}"
                 if "error" not in row else f"  {row['error'][:70]}")
        lines.append(f"{row['dims']:<13}{row['batch']:>6} x {row['seq']:<5}{row['impl']:>9}{cells}")
    for row in _rows(r, "decode_speed"):
        share = "" if row["fraction_of_peak"] is None else f" {row['fraction_of_peak']:.0%} of peak"
        lines.append(f"decode {row['dims']} B {row['batch']} S {row['cache']} {row['impl']}: "
                     f"{row['bandwidth'] / 1e9:.0f} GB/s{share}")
    for row in _rows(r, "moe"):
        cells = (f"err {row['error']:.2e}, {row['fwd_tflops']:.1f} / {row['fwd_bwd_tflops']:.1f}"
                 " TFLOP/s fwd / fwd+bwd" if "failure" not in row else row["failure"][:80])
        lines.append(f"moe {row['choice']:<10} (runs {row['runs']}): {cells}")
    train = r.get("train_step", {})
    if "step_s" in train:
        mfu = "MFU unknown" if train["mfu"] is None else f"MFU {train['mfu']:.1%}"
        lines.append(f"train step {train['variant']} bf16 B {train['batch']} T {train['seq']}: "
                     f"{train['step_s']:.3f} s, {train['tflops']:.1f} TFLOP/s, {mfu} "
                     f"(attention {train['attention_impl']}, matmul {train['grouped_matmul']})")
    elif train:
        lines.append(f"train step: {train.get('failure')}")
    if r["skipped"]:
        lines.append(f"skipped (time budget): {', '.join(r['skipped'])}")
    lines.append(f"wall {r['wall_s']:.0f} s")
    return "\n".join(lines)


def _rows(result: dict, name: str) -> list[dict]:
    value = result.get(name, [])
    return value if isinstance(value, list) else []


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    table = format_table(result)
    result["table"] = table
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    write_json(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
