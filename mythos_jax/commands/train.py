"""Train a Recurrent-Depth Transformer. CONFIG is a preset (tiny, cpu_small, khop, mythos_1b)
or a YAML/JSON file; --set section.field=value overrides any field (see
mythos_jax/train/config.py). Rerunning with the same --workdir resumes from its latest
checkpoint. A run stopped by SIGTERM (preemption) checkpoints, then exits with code 143
(``trainer.PREEMPTED_EXIT``) so that a supervisor restarts it.
"""

from __future__ import annotations

import argparse

from mythos_jax.errors import CommandError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="cpu_small", help="preset name or YAML/JSON file")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics, plots go here")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.FIELD=VALUE", help="override a config field (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config, exit")
    p.add_argument("--allow-data-change", action="store_true",
                   help="resume although the training files changed since the checkpoint "
                        "(a moved held-out split is still refused)")
    group = p.add_argument_group("multi-process (default: single process, or what the "
                                 "environment says; see mythos_jax/train/distributed.py)")
    group.add_argument("--coordinator-address", help="HOST:PORT of process 0")
    group.add_argument("--num-processes", type=int)
    group.add_argument("--process-id", type=int)
    group.add_argument("--local-devices", type=int,
                       help="fake CPU devices per process (local multi-process runs)")


def run(args: argparse.Namespace) -> int:
    """Resolve the config (``--print-config``: print it, exit), then train or resume."""
    from mythos_jax.platforms import use_compilation_cache
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
    from mythos_jax.train.trainer import PREEMPTED_EXIT, TrainingDiverged, train
    from mythos_jax.train.workdir_lock import WorkdirBusy
    try:
        report = train(cfg, args.workdir, allow_data_change=args.allow_data_change)
    except (TrainingDiverged, CheckpointSaveError, WorkdirBusy) as err:
        raise CommandError(str(err)) from None
    return PREEMPTED_EXIT if report.get("preempted") else 0
