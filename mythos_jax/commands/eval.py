"""Loss / accuracy of the newest readable (or --step) checkpoint in WORKDIR on every eval
split, at each test-time loop count: the depth curve.
"""

from __future__ import annotations

import argparse
import json

from mythos_jax.errors import CommandError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True,
                   help="training workdir, or one of its checkpoints WORKDIR/checkpoints/N")
    p.add_argument("--step", type=int, help="checkpoint step (default: newest readable)")
    p.add_argument("--loops", help="comma-separated loop counts (default: the config's)")
    p.add_argument("--batches", type=int, help="batches per split (default: the config's)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--plot", help="also write the depth-curve PNG here")


def run(args: argparse.Namespace) -> int:
    """Restore the checkpoint, print (and optionally write) its depth-curve table."""
    from mythos_jax import paths
    from mythos_jax.budget import check_fits, per_device_bytes
    from mythos_jax.checkpoints.model import is_checkpoint
    from mythos_jax.parallel.mesh import make_mesh
    from mythos_jax.platforms import use_compilation_cache
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
    try:
        checkpointer.check_data(int(state.step), allow_data_change=True)   # held-out unmoved
        results = evaluate(plan, state, loops, args.batches)
    except FileNotFoundError as err:
        raise CommandError(f"eval needs the run's held-out data, which is gone: "
                           f"{err.strerror or err}: {err.filename or ''}".rstrip(": ")) from None
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
