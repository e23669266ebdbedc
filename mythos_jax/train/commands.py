"""``mythos-jax train`` and ``mythos-jax eval``: argument declarations and entry points."""

from __future__ import annotations

import argparse
import json
import os

from mythos_jax.errors import CommandError


def add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train (or resume) a looped model",
        description="Train a Recurrent-Depth Transformer. CONFIG is a preset (tiny, cpu_small, "
                    "khop, mythos_1b) or a YAML/JSON file; --set section.field=value overrides "
                    "any field (see mythos_jax/train/config.py). Rerunning with the same "
                    "--workdir resumes from its latest checkpoint.")
    p.add_argument("--config", default="cpu_small", help="preset name or YAML/JSON file")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics, plots go here")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.FIELD=VALUE", help="override a config field (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config, exit")
    p.add_argument("--allow-data-change", action="store_true",
                   help="resume although the training files changed since the checkpoint "
                        "(a moved held-out split is still refused)")
    _add_distributed(p)
    p.set_defaults(func=cmd_train)


def _add_distributed(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("multi-process (default: single process, or what the "
                                 "environment says; see mythos_jax/train/distributed.py)")
    group.add_argument("--coordinator-address", help="HOST:PORT of process 0")
    group.add_argument("--num-processes", type=int)
    group.add_argument("--process-id", type=int)
    group.add_argument("--local-devices", type=int,
                       help="fake CPU devices per process (local multi-process runs)")


def cmd_train(args: argparse.Namespace) -> int:
    from mythos_jax.train import distributed
    from mythos_jax.train.config import load_train_config

    cfg = load_train_config(args.config, args.overrides)
    if args.print_config:
        print(cfg.to_json())
        return 0
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                           local_device_count=args.local_devices)
    use_compilation_cache()
    from mythos_jax.checkpoints.training import CheckpointSaveError
    from mythos_jax.train.trainer import TrainingDiverged, train
    from mythos_jax.train.workdir_lock import WorkdirBusy
    try:
        train(cfg, args.workdir, allow_data_change=args.allow_data_change)
    except (TrainingDiverged, CheckpointSaveError, WorkdirBusy) as err:
        raise CommandError(str(err)) from None
    return 0


def use_compilation_cache() -> None:
    """With ``$MYTHOS_JAX_CACHE`` set, persist compiled programs there across runs (a resumed
    run skips compiling). Off by default: JAX writes cache entries non-atomically, so a run
    killed mid-write can leave a truncated entry that crashes the next start."""
    import jax
    directory = os.environ.get("MYTHOS_JAX_CACHE")
    if directory and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def add_eval(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a training checkpoint at several loop counts",
        description="Loss / accuracy of the newest readable (or --step) checkpoint in "
                    "WORKDIR on every eval split, at each test-time loop count: the depth "
                    "curve.")
    p.add_argument("--workdir", required=True,
                   help="training workdir, or one of its checkpoints WORKDIR/checkpoints/N")
    p.add_argument("--step", type=int, help="checkpoint step (default: newest readable)")
    p.add_argument("--loops", help="comma-separated loop counts (default: the config's)")
    p.add_argument("--batches", type=int, help="batches per split (default: the config's)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--plot", help="also write the depth-curve PNG here")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from mythos_jax import paths
    from mythos_jax.budget import check_fits, per_device_bytes
    from mythos_jax.checkpoints.model import is_checkpoint
    from mythos_jax.parallel.mesh import make_mesh
    from mythos_jax.checkpoints.training import Checkpointer
    from mythos_jax.train.evaluate import depth_curve_table, evaluate, plot_depth_curve
    from mythos_jax.checkpoints.load import read_train_config, training_source
    from mythos_jax.train.step import build_plan
    from mythos_jax.train.trainer import CONFIG_FILE

    use_compilation_cache()
    source = training_source(args.workdir, args.step)
    if source is None:
        what = "a model checkpoint" if is_checkpoint(args.workdir) else "not a training workdir"
        raise CommandError(f"{args.workdir} is {what}; eval needs a training workdir (or "
                           "WORKDIR/checkpoints/N) for its data and eval config")
    workdir, step = source
    cfg = read_train_config(workdir)
    plan = build_plan(cfg, make_mesh(cfg.mesh))
    model = plan.model_cfg
    check_fits(f"the training state of {workdir}", per_device_bytes(
        plan.abstract_state._asdict(), plan.shardings._asdict()),
        f"its {CONFIG_FILE} asks for dim={model.dim}, vocab_size={model.vocab_size}, "
        f"n_experts={model.n_experts}, expert_dim={model.expert_dim}")
    checkpointer = Checkpointer(workdir, plan)
    state = checkpointer.restore(step=step)
    loops = None if args.loops is None else [int(n) for n in args.loops.split(",")]
    results = evaluate(plan, state, loops, args.batches)
    print(f"checkpoint step {int(state.step)}")
    print(depth_curve_table(results))
    if args.json:
        paths.write_text(args.json, json.dumps(
            {split: {str(n): v for n, v in r.items()} for split, r in results.items()},
            indent=2))
    if args.plot:
        print(f"plot written to {plot_depth_curve(results, args.plot)}")
    checkpointer.close()
    return 0
