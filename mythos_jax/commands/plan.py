"""``mythos-jax plan``: does a variant's training step fit in each chip of a TPU slice?

    mythos-jax plan --variant mythos_1b --topology v4-8 --mesh fsdp=4
    mythos-jax plan --variant mythos_10b --topology v5p-64 --mesh fsdp=32 --json -

The trainer's own step (``mythos_jax.train.step``: forward, loss, backward, AdamW update,
router-bias update) is compiled ahead of time for the slice's TPU topology on this host
(``mythos_jax.plan.memory``): no TPU is needed, only the ``libtpu`` wheel. Without libtpu (or
with ``--analytic``) the command falls back to an analytic estimate and says so on its first
line. A step that does not fit is reported with the compiler's out-of-memory message and exit
code 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

from mythos_jax.modes import AttentionImpl, MoEImpl


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``mythos-jax plan``'s arguments on ``parser``."""
    parser.add_argument("--variant", required=True, metavar="NAME",
                        help="a named config (mythos_jax.variants), e.g. mythos_1b")
    parser.add_argument("--topology", required=True, metavar="TYPE",
                        help="TPU accelerator type as gcloud names it: v4-8, v5litepod-16, "
                             "v5p-64, v6e-8, ...")
    parser.add_argument("--mesh", default="fsdp=-1", metavar="SPEC",
                        help="mesh spec over the slice's chips, e.g. data=2,fsdp=16 "
                             "(default fsdp=-1)")
    parser.add_argument("--batch", type=int, metavar="N",
                        help="global batch in sequences (default: one per device of the "
                             "batch axes data/fsdp/expert)")
    parser.add_argument("--seq-len", type=int, metavar="T",
                        help="tokens per sequence (default: min(max_seq_len, 2048))")
    parser.add_argument("--loops", type=int, metavar="N",
                        help="recurrent loops per step (default: the variant's max_loop_iters)")
    parser.add_argument("--backprop-depth", type=int, metavar="K",
                        help="gradient through the last K loops only (default: all)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="compute dtype (parameters stay fp32; default bfloat16)")
    parser.add_argument("--remat", default="full", choices=("full", "dots", "none"),
                        help="loop_remat: what backprop keeps per loop (default full)")
    parser.add_argument("--moe-impl", choices=MoEImpl.names(),
                        help="MoE dispatch (default: the variant's)")
    parser.add_argument("--attention-impl", choices=AttentionImpl.names(),
                        help="MLA attention: auto (Pallas kernels on TPU), xla or pallas "
                             "(default: the variant's)")
    parser.add_argument("--rules", default="default", metavar="PRESET",
                        help="logical-axis rules preset (mythos_jax.parallel.rules: default, "
                             "fsdp, expert, tensor)")
    parser.add_argument("--analytic", action="store_true",
                        help="skip compilation: analytic estimate only")
    parser.add_argument("--json", metavar="PATH",
                        help="also write the figures (bytes) as JSON to PATH ('-': stdout)")


def plan_spec(args: argparse.Namespace):
    """The ``plan.memory.PlanSpec`` the command line describes (defaults filled in, bounds
    checked; ``batch`` 0 when not given)."""
    from mythos_jax.plan.memory import PlanSpec
    from mythos_jax.variants import get_variant

    overrides = {"dtype": args.dtype, "loop_remat": args.remat}
    for field in ("moe_impl", "attention_impl"):
        if getattr(args, field):
            overrides[field] = getattr(args, field)
    cfg = get_variant(args.variant).replace(**overrides)
    seq_len = args.seq_len or min(cfg.max_seq_len, 2048)
    loops = args.loops or cfg.max_loop_iters
    for name, value, low, high in (("--seq-len", seq_len, 1, cfg.max_seq_len),
                                   ("--loops", loops, 1, None),
                                   ("--batch", args.batch, 1, None),
                                   ("--backprop-depth", args.backprop_depth, 1, None)):
        if value is not None and (value < low or (high is not None and value > high)):
            raise ValueError(f"{name} must be in [{low}, {high or 'inf'}], got {value}")
    return PlanSpec(args.variant, overrides, batch=args.batch or 0, seq_len=seq_len,
                    loops=loops, backprop_depth=args.backprop_depth, rules=args.rules)


def run(args: argparse.Namespace) -> int:
    """``mythos-jax plan``: 0 if the step fits, 1 if not; bad arguments raise ValueError."""
    from mythos_jax.plan.topology import accelerator

    acc = accelerator(args.topology)
    _cpu_only()
    from mythos_jax.parallel.mesh import parse_mesh_spec
    from mythos_jax.plan.memory import plan_memory
    from mythos_jax.plan.report import format_plan
    from mythos_jax.train.step import batch_axes

    spec = plan_spec(args)
    if not spec.batch:
        try:
            sizes = parse_mesh_spec(args.mesh, acc.chips)
        except ValueError:
            sizes = {}      # plan_memory reports the mismatch
        spec = dataclasses.replace(spec, batch=math.prod(sizes.get(a, 1)
                                                         for a in batch_axes(sizes)))
    report = plan_memory(spec, acc, args.mesh, analytic=args.analytic)
    print(format_plan(report), flush=True)
    if args.json:
        text = json.dumps(report.to_dict(), indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 0 if report.fits else 1


def _cpu_only() -> None:
    """Plan never runs anything: keep JAX's own backend on the CPU (on a TPU VM this leaves
    the chips to a training job), unless backends already exist."""
    import jax
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")
