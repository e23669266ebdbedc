"""mythos-jax (jitted) vs open-mythos 0.5.0 (PyTorch), fp32 CPU: forward and training-step
tokens/s, each as a fraction of this machine's fp32 matmul peak measured in the same run.

    python experiments/bench_vs_torch.py                       # the default config
    python experiments/bench_vs_torch.py --preset small        # dim 64, 32 experts
    python experiments/bench_vs_torch.py --quick --json out.json
    python experiments/bench_vs_torch.py --set moe_impl=dense --set lora_rank=16

See experiments/README.md for what is measured; the library is ``mythos_jax.bench``.
"""

from __future__ import annotations

import argparse
import sys

from mythos_jax.bench.presets import PRESETS
from mythos_jax.bench.timing import config_override_arg, wait_for_idle, write_json
from mythos_jax.bench.torch_compare import format_table, run_benchmark
from mythos_jax.modes import AttentionType, MoEImpl


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="model config (default: dim 256, 16 experts, top-2, 8 loops, vocab 4096)")
    p.add_argument("--batch", type=int, help="batch size (preset default: 8)")
    p.add_argument("--seq", type=int, help="sequence length (preset default: 128)")
    p.add_argument("--loops", type=int, help="recurrent loops on both sides (preset default: 8)")
    p.add_argument("--moe-impl", choices=MoEImpl.names(), help="mythos-jax MoE dispatch")
    p.add_argument("--attn-type", choices=AttentionType.names(), help="attention (both sides)")
    p.add_argument("--set", type=config_override_arg, action="append", default=[],
                   metavar="FIELD=VALUE",
                   help="any other MythosConfig field, repeatable")
    p.add_argument("--iters", type=int, help="timed forward calls per side (default 20)")
    p.add_argument("--train-iters", type=int, help="timed training steps per side (default 10)")
    p.add_argument("--no-train", action="store_true", help="skip the training-step benchmark")
    p.add_argument("--quick", action="store_true",
                   help="fewer iterations and a smaller matmul-peak probe (smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spread-routing", action="store_true",
                   help="weights moved away from init so tokens spread over the experts "
                        "(at init all tokens pick the same few experts)")
    p.add_argument("--json", metavar="PATH", help="write all figures and the config here")
    p.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                   help="first wait up to SECONDS for other processes to leave the CPU idle")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = dict(args.set)
    if args.moe_impl:
        overrides["moe_impl"] = args.moe_impl
    if args.attn_type:
        overrides["attn_type"] = args.attn_type
    log = None if args.quiet else (lambda msg: print(f"[bench] {msg}", file=sys.stderr,
                                                      flush=True))
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle, log=log)
    result = run_benchmark(overrides, preset=args.preset, batch=args.batch, seq_len=args.seq,
                           n_loops=args.loops, iters=args.iters, train_iters=args.train_iters,
                           quick=args.quick, seed=args.seed,
                           spread_routing=args.spread_routing, train=not args.no_train, log=log)
    print(format_table(result))
    print(f"(wall time {result['wall_s']:.0f} s)")
    write_json(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
