"""Build small OpenMythos models in PyTorch (open-mythos 0.5.0) with weights moved away from
init, convert them, compare logits over attention types, loop counts and sequence lengths, then
benchmark both implementations. ``--trace``: instead, one model side by side stage by stage
(embed, prelude layers, each loop iteration, coda layers, logits), in fp32 or bf16.
"""

from __future__ import annotations

import argparse

from mythos_jax.errors import CommandError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="default", help="benchmark config (default, small, tiny)")
    p.add_argument("--quick", action="store_true", help="fewer benchmark iterations")
    p.add_argument("--no-bench", action="store_true", help="parity table only")
    p.add_argument("--json", metavar="PATH", help="write all figures as JSON")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="instead: this model (a training workdir, WORKDIR/checkpoints/N, a "
                        "model checkpoint, a .pt/.safetensors file) against its PyTorch "
                        "conversion; no benchmark")
    p.add_argument("--step", type=int, metavar="N", help="checkpoint step of a training workdir")
    trace = p.add_argument_group("trace (where the two implementations part)")
    trace.add_argument("--trace", action="store_true",
                       help="per-stage table of one model (--checkpoint, or the perturbed MLA "
                            "parity model) instead of the logit table; no benchmark")
    trace.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                       help="bfloat16: OpenMythos under torch.autocast vs mythos-jax bf16 "
                            "compute, each also against its fp32 self")
    trace.add_argument("--loops", type=int, metavar="N", help="loop count (default: the "
                                                              "config's max_loop_iters)")
    trace.add_argument("--seq-len", type=int, default=16, metavar="T",
                       help="tokens per sequence (2 random sequences; capped at max_seq_len)")
    trace.add_argument("--tolerance", type=float, metavar="X",
                       help="relative difference a stage may reach (default 1e-5 fp32, "
                            "1e-2 bf16)")
    trace.add_argument("--plot", metavar="PNG", help="draw the divergence per loop")


def run(args: argparse.Namespace) -> int:
    """Parity table (exit 1 if any row is off), then the speed table; with ``--trace`` the
    stage table (exit 1 if a stage of the main comparison is over the tolerance)."""
    from mythos_jax.bench.timing import write_json

    if args.trace:
        result = _trace(args)
        ok = result["ok"]
    else:
        if args.dtype != "float32" or args.plot or args.loops is not None:
            raise CommandError("--dtype, --loops and --plot need --trace")
        result = _logit_parity(args)
        ok = all(r["ok"] for r in result["parity"])
    write_json(result, args.json)
    return 0 if ok else 1


def _logit_parity(args: argparse.Namespace) -> dict:
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
    return result


def _trace(args: argparse.Namespace) -> dict:
    from mythos_jax.commands.model_source import checkpoint_model
    from mythos_jax.interop.parity import build_pair
    from mythos_jax.interop.trace import format_report, plot_divergence, trace_parity

    if args.checkpoint is None:
        torch_model, jax_model = build_pair("mla")
    else:
        torch_model, jax_model = None, checkpoint_model(args.checkpoint, args.step)
    if args.loops is not None and args.loops < 1:
        raise CommandError(f"--loops must be >= 1, got {args.loops}")
    if args.seq_len < 1:
        raise CommandError(f"--seq-len must be >= 1, got {args.seq_len}")
    report = trace_parity(torch_model, jax_model, loops=args.loops, dtype=args.dtype,
                          tolerance=args.tolerance,
                          seq_len=min(args.seq_len, jax_model.cfg.max_seq_len))
    print(format_report(report), flush=True)
    if args.plot:
        plot_divergence(report, args.plot)
        print(f"wrote {args.plot}")
    return report
