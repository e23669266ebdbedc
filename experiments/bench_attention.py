"""MLA attention kernels against XLA: max errors on any backend, speed on GPU/TPU.

    python experiments/bench_attention.py                  # on the backend JAX finds
    python experiments/bench_attention.py --quick          # tiny shapes (seconds)
    python experiments/bench_attention.py --json out.json  # also write every figure
    python experiments/bench_attention.py --mode speed --quick   # the timing path, tiny

errors (every backend; off GPU/TPU the kernels run in interpret mode, GPU- and TPU-style):
  max |kernel - reference| of the flash forward and of the gradients of sum(out * dout)
  (q_nope, q_rope, k_nope, k_rope, v), fp32 and bf16 inputs, and of the latent decode, with
  the reference in fp32 on the same inputs; for bf16 also XLA's own bf16 error, for scale.
speed (GPU/TPU; on CPU only as a smoke test of this path: interpret-mode times mean nothing):
  flash attention, bf16, causal, seq 2048/4096/8192 x batch (16k tokens), 16 heads, MLA head
  dims (nope+rope / v) of mythos_1b (64+32 / 64) and DeepSeek-V3 (128+64 / 128): TFLOP/s of
  forward and forward+backward for the kernel, the XLA reference, and
  ``jax.nn.dot_product_attention`` with v zero-padded to the qk dim. Causal FLOPs: forward
  2*B*H*(T^2/2)*(dqk + dv), backward 2*B*H*(T^2/2)*(3*dqk + 2*dv) (QK^T recomputed).
  Latent decode, bf16, batch 8, cache 4096/32768 slots, every slot valid (mythos_1b: 16 heads,
  kv_lora 256 + rope 32; DeepSeek-V3: 128 heads, 512 + 64): achieved HBM bandwidth = bytes of
  c_kv, k_rope and the queries / time, against the device's peak (H200: 4.8 TB/s).
Times: median of ``--iters`` calls of the jitted function after one warm-up (compile not
included). See experiments/README.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from mythos_jax.bench.timing import timed, write_json
from mythos_jax.chips import chip
from mythos_jax.kernels import (FlashBlocks, KernelTarget, kernel_target,
                                mla_decode_reference, mla_flash_attention, mla_flash_reference)
from mythos_jax.kernels.dispatch import attention_table_line
from mythos_jax.kernels.mla_decode import DecodeBlocks, mla_decode_attention

FLASH_DIMS = {"mythos_1b": (64, 32, 64), "deepseek_v3": (128, 64, 128)}   # nope, rope, v
DECODE_DIMS = {"mythos_1b": (16, 256, 32), "deepseek_v3": (128, 512, 64)}  # heads, kv_lora, rope
GRAD_NAMES = ("q_nope", "q_rope", "k_nope", "k_rope", "v")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("auto", "errors", "speed"), default="auto",
                   help="auto: speed on GPU/TPU, errors elsewhere (errors always run)")
    p.add_argument("--quick", action="store_true", help="tiny shapes")
    p.add_argument("--iters", type=int, default=10, help="timed calls per figure")
    p.add_argument("--json", metavar="PATH", help="write every figure here")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ inputs
def flash_inputs(batch, heads, length, dims, dtype, seed=0):
    """[q_nope, q_rope, k_nope, k_rope, v, dout] for head dims (nope, rope, v)."""
    nope, rope, v_dim = dims
    shapes = [(batch, heads, length, nope), (batch, heads, length, rope),
              (batch, heads, length, nope), (batch, length, rope),
              (batch, heads, length, v_dim), (batch, heads, length, v_dim)]
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in zip(keys, shapes)]


def decode_inputs(batch, length, dims, dtype, seed=0):
    """[q_latent, q_rope, c_kv, k_rope] for (heads, kv_lora, rope)."""
    heads, latent, rope = dims
    shapes = [(batch, heads, latent), (batch, heads, rope), (batch, length, latent),
              (batch, length, rope)]
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in zip(keys, shapes)]


# ------------------------------------------------------------------------------ programs
def flash_programs(scale: float, target: KernelTarget, blocks: FlashBlocks | None):
    """name -> attention(q_nope, q_rope, k_nope, k_rope, v) -> (B, H, T, v_dim), causal."""
    def kernel(*a):
        return mla_flash_attention(*a, scale=scale, blocks=blocks, target=target)

    def xla(*a):
        return mla_flash_reference(*a, jnp.zeros((a[0].shape[0],), jnp.int32), scale=scale)

    def dot_product_attention(q_nope, q_rope, k_nope, k_rope, v):
        """jax.nn.dot_product_attention needs one head dim: v zero-padded to nope + rope."""
        to_bthd = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
        q = jnp.concatenate([q_nope, q_rope], -1)
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, None], q_rope.shape)], -1)
        v_padded = jnp.pad(v, [(0, 0)] * 3 + [(0, q.shape[-1] - v.shape[-1])])
        out = jax.nn.dot_product_attention(to_bthd(q), to_bthd(k), to_bthd(v_padded),
                                           scale=scale, is_causal=True)
        return to_bthd(out)[..., :v.shape[-1]]
    return {"kernel": kernel, "xla": xla, "dot_product_attention": dot_product_attention}


def forward_backward(attention):
    """(inputs..., dout) -> gradients of sum(out * dout) w.r.t. the five inputs."""
    def loss(*args):
        *inputs, dout = args
        return jnp.sum(attention(*inputs).astype(jnp.float32) * dout.astype(jnp.float32))
    return jax.grad(loss, argnums=tuple(range(5)))


def median_seconds(fn, args, iters: int) -> float:
    compiled = jax.jit(fn).lower(*args).compile()
    return statistics.median(timed(lambda: jax.block_until_ready(compiled(*args)), iters, 1))


def max_error(got, want) -> float:
    return float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))


# ------------------------------------------------------------------------------ errors
def error_rows(quick: bool, targets: list[KernelTarget]) -> list[dict]:
    """Max errors of every kernel style against the fp32 reference, fp32 and bf16 inputs:
    flash forward (plain causal and left-padded), its gradients, latent decode."""
    batch, heads, length = (2, 2, 24) if quick else (2, 4, 200)
    dims = (16, 16, 32) if quick else FLASH_DIMS["mythos_1b"]
    decode_dims, decode_len = ((4, 32, 16), 40) if quick else (DECODE_DIMS["mythos_1b"], 300)
    scale, decode_scale = (dims[0] + dims[1]) ** -0.5, (decode_dims[1] + decode_dims[2]) ** -0.5
    flash_blocks = FlashBlocks(16, 16, 16, 16) if quick else None
    decode_blocks = DecodeBlocks(block_h=8, block_k=16) if quick else None
    starts = jnp.asarray([0, length // 3], jnp.int32)             # left padding
    begins = jnp.asarray([0, decode_len // 2], jnp.int32)         # valid cache slots
    ends = jnp.asarray([decode_len, decode_len - 7], jnp.int32)

    def everything(flash, decode):
        """(flash arrays, decode arrays) -> [out, 5 grads, left-padded out, decode out]."""
        def run(arrays, latent):
            out = flash(*arrays[:5], jnp.zeros((batch,), jnp.int32))
            grads = forward_backward(lambda *a: flash(*a, jnp.zeros((batch,), jnp.int32)))(
                *arrays)
            return [out, *grads, flash(*arrays[:5], starts), decode(*latent)]
        return jax.jit(run)

    reference = everything(
        lambda *a: mla_flash_reference(*a, scale=scale),
        lambda *a: mla_decode_reference(*a, begins, ends, scale=decode_scale))
    rows = []
    for dtype in (jnp.float32, jnp.bfloat16):
        arrays = flash_inputs(batch, heads, length, dims, dtype)
        latent = decode_inputs(batch, decode_len, decode_dims, dtype)
        exact = reference([x.astype(jnp.float32) for x in arrays],
                          [x.astype(jnp.float32) for x in latent])
        xla = reference(arrays, latent)
        for target in targets:
            got = everything(
                lambda *a, t=target: mla_flash_attention(*a, scale=scale, blocks=flash_blocks,
                                                         target=t),
                lambda *a, t=target: mla_decode_attention(*a, begins, ends, scale=decode_scale,
                                                          blocks=decode_blocks, target=t),
            )(arrays, latent)
            errors = [max_error(g, e) for g, e in zip(got, exact)]
            xla_errors = [max_error(x, e) for x, e in zip(xla, exact)]
            rows.append(dict(
                kernel_style=target.backend, interpret=bool(target.interpret),
                dtype=jnp.dtype(dtype).name, flash_shape=[batch, heads, length, *dims],
                decode_shape=[batch, decode_len, *decode_dims],
                flash_out=errors[0], flash_grads=dict(zip(GRAD_NAMES, errors[1:6])),
                flash_left_padded_out=errors[6], decode_out=errors[7],
                xla_out=xla_errors[0], xla_grads=dict(zip(GRAD_NAMES, xla_errors[1:6])),
                xla_left_padded_out=xla_errors[6], xla_decode_out=xla_errors[7]))
    return rows


# ------------------------------------------------------------------------------ speed
def flash_speed_rows(quick: bool, iters: int, target: KernelTarget) -> list[dict]:
    lengths = (32,) if quick else (2048, 4096, 8192)
    tokens, heads = (64, 2) if quick else (16384, 16)
    dims_by_name = {"tiny": (16, 16, 16)} if quick else FLASH_DIMS
    rows = []
    for name, dims in dims_by_name.items():
        dqk, dv = dims[0] + dims[1], dims[2]
        for length in lengths:
            batch = max(1, tokens // length)
            arrays = flash_inputs(batch, heads, length, dims, jnp.bfloat16)
            causal_pairs = batch * heads * length * length / 2
            flops = {"fwd": 2 * causal_pairs * (dqk + dv),
                     "fwd+bwd": 2 * causal_pairs * (4 * dqk + 3 * dv)}
            for impl, attention in flash_programs(dqk ** -0.5, target, None).items():
                row = dict(dims=name, head_dims=list(dims), batch=batch, heads=heads,
                           seq=length, impl=impl)
                try:
                    row["fwd_s"] = median_seconds(attention, arrays[:5], iters)
                    row["fwd+bwd_s"] = median_seconds(forward_backward(attention), arrays,
                                                      iters)
                    for phase in flops:
                        row[f"{phase}_tflops"] = flops[phase] / row[f"{phase}_s"] / 1e12
                except Exception as error:   # e.g. an XLA reference out of memory
                    row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
                rows.append(row)
    return rows


def decode_speed_rows(quick: bool, iters: int, target: KernelTarget, peak) -> list[dict]:
    lengths, batch = ((64,), 2) if quick else ((4096, 32768), 8)
    dims_by_name = {"tiny": (4, 32, 16)} if quick else DECODE_DIMS
    rows = []
    for name, dims in dims_by_name.items():
        for length in lengths:
            arrays = decode_inputs(batch, length, dims, jnp.bfloat16)
            starts, ends = jnp.zeros((batch,), jnp.int32), jnp.full((batch,), length, jnp.int32)
            scale = (dims[1] + dims[2]) ** -0.5
            moved = sum(x.size * x.dtype.itemsize for x in arrays)
            for impl, fn in (("kernel", lambda *a: mla_decode_attention(
                    *a, starts, ends, scale=scale, target=target)),
                             ("xla", lambda *a: mla_decode_reference(*a, starts, ends,
                                                                     scale=scale))):
                seconds = median_seconds(fn, arrays, iters)
                rows.append(dict(dims=name, batch=batch, cache=length, impl=impl, s=seconds,
                                 bytes=moved, bandwidth=moved / seconds,
                                 fraction_of_peak=None if peak is None else moved / seconds
                                 / peak))
    return rows


# ------------------------------------------------------------------------------ report
def run(args) -> dict:
    start = time.perf_counter()
    device = jax.devices()[0]
    native = kernel_target()
    targets = [native] if not native.interpret else [KernelTarget("gpu", True),
                                                     KernelTarget("tpu", True)]
    result = dict(machine=dict(platform=platform.platform(), jax=jax.__version__,
                               backend=jax.default_backend(), device=device.device_kind),
                  quick=args.quick, errors=error_rows(args.quick, targets))
    speed = args.mode == "speed" or (args.mode == "auto" and not native.interpret)
    if speed:
        figures = chip(device.device_kind)
        peak = None if figures is None else figures.hbm_bytes_per_s
        result.update(flash_speed=flash_speed_rows(args.quick, args.iters, native),
                      decode_speed=decode_speed_rows(args.quick, args.iters, native, peak),
                      hbm_peak=peak, speed_is_meaningful=not native.interpret)
    result["wall_s"] = time.perf_counter() - start
    return result


def format_table(result: dict) -> str:
    m = result["machine"]
    lines = [f"jax {m['jax']} on {m['backend']} ({m['device']}); kernels "
             + ("interpreted" if result["errors"][0]["interpret"] else "compiled"),
             attention_table_line(),
             "max |error| vs the fp32 reference (same inputs); xla = XLA's own error",
             f"{'style':<6}{'dtype':<10}{'flash out':>11}{'xla':>10}{'worst grad':>12}"
             f"{'xla':>10}{'left-pad':>10}{'decode':>10}{'xla':>10}"]
    for r in result["errors"]:
        lines.append(f"{r['kernel_style']:<6}{r['dtype']:<10}{r['flash_out']:>11.2e}"
                     f"{r['xla_out']:>10.2e}{max(r['flash_grads'].values()):>12.2e}"
                     f"{max(r['xla_grads'].values()):>10.2e}{r['flash_left_padded_out']:>10.2e}"
                     f"{r['decode_out']:>10.2e}{r['xla_decode_out']:>10.2e}")
    if "flash_speed" in result:
        if not result["speed_is_meaningful"]:
            lines.append("speed path smoke test (interpret mode: the times mean nothing)")
        lines.append(f"flash attention bf16 causal TFLOP/s\n{'dims':<13}{'B x T':>11}"
                     f"{'impl':>23}{'fwd':>9}{'fwd+bwd':>9}")
        for r in result["flash_speed"]:
            cells = (f"{r['fwd_tflops']:>9.1f}{r['fwd+bwd_tflops']:>9.1f}" if "error" not in r
                     else f"  {r['error'][:60]}")
            lines.append(f"{r['dims']:<13}{r['batch']:>5} x {r['seq']:<5}{r['impl']:>23}{cells}")
        peak = result["hbm_peak"]
        lines.append(f"latent decode bf16: achieved bandwidth (peak "
                     f"{'unknown' if peak is None else f'{peak / 1e12:.1f} TB/s'})")
        for r in result["decode_speed"]:
            share = "" if r["fraction_of_peak"] is None else f"{r['fraction_of_peak']:>7.0%}"
            lines.append(f"{r['dims']:<13}B {r['batch']} S {r['cache']:<7}{r['impl']:>8}"
                         f"{r['s'] * 1e6:>10.0f} us{r['bandwidth'] / 1e9:>9.0f} GB/s{share}")
    lines.append(f"wall {result['wall_s']:.0f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(format_table(result))
    write_json(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
