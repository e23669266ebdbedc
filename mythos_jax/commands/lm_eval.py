"""Benchmark a model with EleutherAI's lm-evaluation-harness at several test-time depths: one
evaluation per --loops count (and one with the --exit rule, if given), the model loaded once.
Prints a task x depth table of each task's main metric (with an exit rule, the mean loops it
used per task); --json writes every metric at every depth, --plot each task's metric against
the loops. Tasks are lm-eval's or local YAML files under --include-path (e.g.
experiments/lm_eval_tasks, which reads its JSONL data without the network). Needs the
``eval`` extra (pip install 'mythos-jax[eval]').
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from mythos_jax import paths
from mythos_jax.errors import CommandError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a training workdir (its newest readable checkpoint), a training "
                        "checkpoint WORKDIR/checkpoints/N, a model checkpoint or OpenMythos "
                        "weights (.pt/.pth/.safetensors)")
    p.add_argument("--tokenizer", metavar="SPEC",
                   help="'bytes' or a tokenizer.json (default: the one stored with the model)")
    p.add_argument("--tasks", required=True, metavar="T1,T2",
                   help="comma-separated lm-eval task (or group) names")
    p.add_argument("--include-path", metavar="DIR",
                   help="a folder of task YAML files, searched before lm-eval's own tasks")
    p.add_argument("--loops", metavar="N1,N2",
                   help="comma-separated loop counts, one evaluation each (default: the "
                        "config's max_loop_iters, unless --exit is given)")
    p.add_argument("--exit", metavar="RULE",
                   help="also evaluate with this exit rule (act, kl, kl_entropy, delta)")
    p.add_argument("--max-loops", type=int, metavar="N",
                   help="the exit rule's bound (default: the config's max_loop_iters)")
    p.add_argument("--threshold", type=float, metavar="X", help="the exit rule's threshold")
    p.add_argument("--limit", type=int, metavar="N", help="documents per task (for a quick look)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B",
                   help="sequences per forward (default 8)")
    p.add_argument("--max-length", type=int, metavar="L",
                   help="longest input in tokens (default: the model's max_seq_len)")
    p.add_argument("--json", metavar="OUT", help="also write every metric at every depth here")
    p.add_argument("--plot", metavar="PNG", help="also plot each task's metric against loops")


def run(args: argparse.Namespace) -> int:
    """Evaluate at each depth, then print (and optionally write) the table."""
    from mythos_jax.commands.generate import _generation_vocab
    from mythos_jax.commands.model_source import checkpoint_model
    from mythos_jax.evaluation import report

    try:
        import lm_eval
        from mythos_jax.evaluation.lm_eval_model import MythosLM, loop_spec
    except ImportError as err:
        raise CommandError(f"lm-eval is not installed ({err}): pip install "
                           "'mythos-jax[eval]'") from None
    logging.getLogger("lm_eval").setLevel(logging.ERROR)   # its warnings would bury the table
    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks:
        raise CommandError("--tasks names no task")
    counts = _counts(args.loops)
    specs = [loop_spec(n) for n in counts or ([] if args.exit else [None])]
    if args.exit is not None:
        specs.append(loop_spec(exit=args.exit, max_loops=args.max_loops,
                               threshold=args.threshold))
    elif args.max_loops is not None or args.threshold is not None:
        raise CommandError("--max-loops and --threshold go with --exit")
    if args.limit is not None and args.limit < 1:
        raise CommandError(f"--limit must be >= 1, got {args.limit}")
    manager = _task_manager(tasks, args.include_path)

    model = checkpoint_model(args.checkpoint, None)
    lm = MythosLM(model, _generation_vocab(args, model.cfg.vocab_size), specs[0],
                  args.batch_size, args.max_length)
    results = []
    for spec in specs:
        lm.loops = spec
        lm.loops_used.clear()
        print(f"evaluating {report.depth_label(lm.loops)} ...", file=sys.stderr, flush=True)
        output = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager,
                                         limit=args.limit, log_samples=False)
        results.append(report.depth_result(lm.loops, output, lm.loops_used))
    print(report.table(results))
    if args.json:
        paths.write_text(args.json, json.dumps(
            {"checkpoint": args.checkpoint, "tasks": tasks, "limit": args.limit,
             **report.as_json(results)}, indent=2))
    if args.plot:
        print(f"plot written to "
              f"{report.plot(results, args.plot, f'{args.checkpoint}: lm-eval by depth')}")
    return 0


def _counts(loops: str | None) -> list[int]:
    """--loops as ints >= 1."""
    if loops is None:
        return []
    try:
        counts = [int(n) for n in loops.split(",")]
    except ValueError:
        raise CommandError(f"--loops must be comma-separated integers, got {loops!r}") from None
    if min(counts) < 1:
        raise CommandError(f"--loops must be >= 1, got {loops}")
    return counts


def _task_manager(tasks: list[str], include_path: str | None):
    """lm-eval's TaskManager for ``tasks``: the --include-path folder alone when it holds them
    all (indexing lm-eval's own tasks takes seconds), else with lm-eval's tasks."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not paths.resolve(include_path).is_dir():
            raise CommandError(f"--include-path {include_path}: no such directory")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f"--include-path {include_path} nor " if include_path else ""
        raise CommandError(f"unknown task(s) {', '.join(unknown)}: not in {where}lm-eval's "
                           "tasks")
    return manager
