"""``mythos-jax plan``: does a variant's training step fit in each chip of a TPU slice?

    mythos-jax plan --variant mythos_1b --topology v4-8 --mesh fsdp=4
    mythos-jax plan --variant mythos_10b --topology v5p-64 --mesh fsdp=32 --json -
    mythos-jax plan --experiment looped_vs_standard       # every arm of its pod preset

``--experiment NAME`` plans the training step of every arm of the experiment's pod preset
(``mythos_jax.experiments``), each as its config trains, on the preset's topology and mesh
unless given; arms whose programs differ only in constants compile once. ``--experiment all
--jobs 2 --store DIR --compile-budget 30`` is CI's check (``make plan-pods``): every arm of
every experiment, two programs compiled at a time, figures kept in DIR for the next run (a
program compiled before by the same libtpu for the same slice is not compiled again), and no
new compile after 30 minutes beyond the largest arm of each experiment.

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
import time

from mythos_jax.modes import AttentionImpl, MoEImpl


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``mythos-jax plan``'s arguments on ``parser``."""
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--variant", metavar="NAME",
                        help="a named config (mythos_jax.variants), e.g. mythos_1b")
    target.add_argument("--experiment", metavar="NAME",
                        help="every arm of an experiment's pod preset, e.g. "
                             "looped_vs_standard (several: A,B; every experiment: all)")
    parser.add_argument("--arms", metavar="A,B",
                        help="with one --experiment: these arms only (default: all)")
    parser.add_argument("--heaviest", type=int, metavar="K",
                        help="with --experiment: estimate every arm, compile only the K "
                             "with the largest estimates of each experiment")
    parser.add_argument("--compile-budget", type=float, metavar="MINUTES",
                        help="with --experiment: compile every arm, each experiment's "
                             "largest estimate first, then the others largest first; after "
                             "MINUTES no new compile starts and the arms left keep their "
                             "estimate (the largest of each experiment is always compiled)")
    parser.add_argument("--jobs", type=int, metavar="N",
                        help="with --experiment: programs compiled side by side (default 1)")
    parser.add_argument("--store", metavar="DIR",
                        help="with --experiment: keep libtpu's figures per program in DIR "
                             "and reuse those of the same program, compiler and slice")
    parser.add_argument("--topology", metavar="TYPE",
                        help="TPU accelerator type as gcloud names it: v4-8, v5litepod-16, "
                             "v5p-64, v6e-8, ... (required with --variant; default with "
                             "--experiment: its preset's)")
    parser.add_argument("--mesh", metavar="SPEC",
                        help="mesh spec over the slice's chips, e.g. data=2,fsdp=16 "
                             "(default fsdp=-1, or the experiment preset's)")
    parser.add_argument("--batch", type=int, metavar="N",
                        help="global batch in sequences (default: one per device of the "
                             "batch axes data/fsdp/expert)")
    parser.add_argument("--seq-len", type=int, metavar="T",
                        help="tokens per sequence (default: min(max_seq_len, 2048))")
    parser.add_argument("--loops", type=int, metavar="N",
                        help="recurrent loops per step (default: the variant's max_loop_iters)")
    parser.add_argument("--backprop-depth", type=int, metavar="K",
                        help="gradient through the last K loops only (default: all)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"),
                        help="compute dtype (parameters stay fp32; default bfloat16)")
    parser.add_argument("--remat", choices=("full", "dots", "none"),
                        help="loop_remat: what backprop keeps per loop (default full)")
    parser.add_argument("--moe-impl", choices=MoEImpl.names(),
                        help="MoE dispatch (default: the variant's)")
    parser.add_argument("--attention-impl", choices=AttentionImpl.names(),
                        help="MLA attention: auto (Pallas kernels on TPU), xla or pallas "
                             "(default: the variant's)")
    parser.add_argument("--rules", metavar="PRESET",
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

    overrides = {"dtype": args.dtype or "bfloat16", "loop_remat": args.remat or "full"}
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
                    loops=loops, backprop_depth=args.backprop_depth,
                    rules=args.rules or "default")


# the step's own settings: an experiment arm takes them from its config
_VARIANT_ONLY = ("batch", "seq_len", "loops", "backprop_depth", "dtype", "remat", "moe_impl",
                 "attention_impl", "rules")


def run(args: argparse.Namespace) -> int:
    """``mythos-jax plan``: 0 if the step fits, 1 if not; bad arguments raise ValueError."""
    if args.experiment:
        return run_experiment(args)
    experiment_only = ("arms", "heaviest", "compile_budget", "jobs", "store")
    if any(getattr(args, name) is not None for name in experiment_only):
        raise ValueError("--arms, --heaviest, --compile-budget, --jobs and --store go with "
                         "--experiment")
    if not args.topology:
        raise ValueError("--topology is required with --variant")
    return run_variant(args)


def run_variant(args: argparse.Namespace) -> int:
    """One variant's step on ``--topology``: the per-device table."""
    from mythos_jax.plan.topology import accelerator

    acc = accelerator(args.topology)
    args.mesh = args.mesh or "fsdp=-1"
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
    _write_json(args.json, report.to_dict())
    return 0 if report.fits else 1


def run_experiment(args: argparse.Namespace) -> int:
    """Every (chosen) arm of the named experiments' pod presets, at seed 0: one table per
    experiment, one row per arm; 0 if all fit."""
    import concurrent.futures

    from mythos_jax.plan.compiled import FROM_STORE, CompilerFigures
    from mythos_jax.plan.memory import plan_memory
    from mythos_jax.plan.report import format_arm_plans

    given = [f"--{f.replace('_', '-')}" for f in _VARIANT_ONLY if getattr(args, f) is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: with --experiment each arm's step is its own "
                         f"config (pass these with --variant)")
    for flag, value, low in (("--heaviest", args.heaviest, 1), ("--jobs", args.jobs, 1),
                             ("--compile-budget", args.compile_budget, 0)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.heaviest is not None and args.compile_budget is not None:
        raise ValueError("--heaviest and --compile-budget exclude each other")
    plans = _experiment_plans(args)
    tasks = [] if args.analytic else _compile_order(plans, args.heaviest,
                                                   args.compile_budget is not None)
    deadline = (None if args.compile_budget is None
                else time.monotonic() + 60 * args.compile_budget)
    figures = CompilerFigures(args.store)

    def plan_one(task: tuple[_ExperimentPlan, int, bool]):
        plan, i, must = task
        report = plan_memory(plan.specs[i], plan.acc, plan.mesh, compiled=figures,
                             may_compile=lambda: must or time.monotonic() < deadline)
        plan.reports[i] = report
        how = (f"compiled ({'from the store' if report.figures_from == FROM_STORE else 'now'})"
               if report.method == "compiled" else report.reason)
        print(f"{plan.name}/{report.variant}: {report.total / 2 ** 30:.2f} GiB per device, "
              f"{how} ({'fits' if report.fits else 'DOES NOT FIT'})", flush=True)

    with concurrent.futures.ThreadPoolExecutor(args.jobs or 1) as pool:
        list(pool.map(plan_one, tasks))
    for plan in plans:
        print(format_arm_plans(plan.name, plan.reports), flush=True)
    reports = [{"experiment": plan.name, **r.to_dict()} for plan in plans for r in plan.reports]
    _write_json(args.json, reports)
    return 0 if all(r["fits"] for r in reports) else 1


@dataclasses.dataclass
class _ExperimentPlan:
    """One experiment's pod arms to plan: specs, slice, mesh and reports (the estimates until
    a compiled report replaces one)."""
    name: str
    acc: object
    mesh: str
    specs: list
    reports: list


def _experiment_plans(args: argparse.Namespace) -> list[_ExperimentPlan]:
    """The arms of ``--experiment`` (NAME, NAME,NAME or all), each estimated."""
    from mythos_jax.experiments import EXPERIMENTS, get_experiment
    from mythos_jax.plan.memory import PlanSpec, plan_memory
    from mythos_jax.plan.topology import accelerator

    names = (list(EXPERIMENTS) if args.experiment == "all"
             else [n.strip() for n in args.experiment.split(",") if n.strip()])
    if args.arms is not None and len(names) != 1:
        raise ValueError("--arms goes with a single --experiment")
    chosen = None if args.arms is None else [a.strip() for a in args.arms.split(",")
                                             if a.strip()]
    plans = []
    for name in names:
        experiment = get_experiment(name).at_pod_scale()
        acc = accelerator(args.topology or experiment.pod.topology)
        mesh = args.mesh or experiment.pod.mesh
        arms = experiment.arms if chosen is None else experiment.chosen_arms(chosen)
        specs = [PlanSpec.of_train_config(arm.name, experiment.arm_fields(arm, seed=0))
                 for arm in arms]     # the optional arms too: --arms trains them
        plans.append(_ExperimentPlan(name, acc, mesh, specs, []))
    _cpu_only()
    for plan in plans:
        plan.reports = [plan_memory(spec, plan.acc, plan.mesh, analytic=True)
                        for spec in plan.specs]
    return plans


def _compile_order(plans: list[_ExperimentPlan], heaviest: int | None,
                   budgeted: bool) -> list[tuple[_ExperimentPlan, int, bool]]:
    """(plan, arm index, must compile) in the order to compile: with ``heaviest``, only that
    many of each experiment's largest estimates; with a budget, the largest of each experiment
    first (always compiled), then every other arm by its estimate, largest first, compiled
    while the budget lasts; otherwise every arm."""
    ranked = [(plan, sorted(range(len(plan.specs)), key=lambda i, p=plan: p.reports[i].total,
                            reverse=True)) for plan in plans]
    if heaviest is not None:
        return [(plan, i, True) for plan, order in ranked for i in order[:heaviest]]
    if not budgeted:
        return [(plan, i, True) for plan, order in ranked for i in order]
    first = [(plan, order[0], True) for plan, order in ranked]
    rest = sorted(((plan, i, False) for plan, order in ranked for i in order[1:]),
                  key=lambda task: task[0].reports[task[1]].total, reverse=True)
    return first + rest


def _write_json(path: str | None, figures) -> None:
    """``figures`` as JSON to ``path`` ('-': stdout; None: nowhere)."""
    if not path:
        return
    text = json.dumps(figures, indent=2)
    if path == "-":
        print(text)
    else:
        with open(path, "w") as f:
            f.write(text + "\n")


def _cpu_only() -> None:
    """Plan never runs anything: keep JAX's own backend on the CPU (on a TPU VM this leaves
    the chips to a training job), unless backends already exist, and leave the persistent
    compilation cache off (compile-only executables cannot be loaded back)."""
    import jax
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_enable_compilation_cache", False)
