"""Build small OpenMythos models in PyTorch (open-mythos 0.5.0) with weights moved away from
init, convert them, compare logits over attention types, loop counts and sequence lengths, then
benchmark both implementations.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="default", help="benchmark config (default, small, tiny)")
    p.add_argument("--quick", action="store_true", help="fewer benchmark iterations")
    p.add_argument("--no-bench", action="store_true", help="parity table only")
    p.add_argument("--json", metavar="PATH", help="write all figures as JSON")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="instead: this model (a training workdir, WORKDIR/checkpoints/N, a "
                        "model checkpoint) against its PyTorch conversion; no benchmark")
    p.add_argument("--step", type=int, metavar="N", help="checkpoint step of a training workdir")


def run(args: argparse.Namespace) -> int:
    """Parity table (exit 1 if any row is off), then the speed table."""
    from mythos_jax.bench.timing import write_json
    from mythos_jax.bench.torch_compare import format_table, run_benchmark
    from mythos_jax.commands.model_source import checkpoint_model
    from mythos_jax.interop.parity import format_parity, model_parity, parity_report

    if args.checkpoint is None:
        rows = parity_report()
    else:
        rows = model_parity(checkpoint_model(args.checkpoint, args.step))
    print(format_parity(rows), flush=True)
    result = {"parity": rows}
    if not args.no_bench and args.checkpoint is None:
        print(flush=True)
        result["benchmark"] = run_benchmark(preset=args.preset, quick=args.quick)
        print(format_table(result["benchmark"]))
    write_json(result, args.json)
    return 0 if all(r["ok"] for r in rows) else 1
