"""The training loop behind ``mythos-jax train``.

    result = train(load_train_config("tiny"), "runs/tiny")

Restarting with the same workdir resumes from the latest checkpoint (parameters, optimizer,
step and the data stream's position), so a killed run continues with the same per-step losses
and no batch repeated or skipped. SIGTERM (preemption) saves a checkpoint at a step boundary
and leaves (the report says ``preempted``; ``mythos-jax train`` then exits with code
``PREEMPTED_EXIT``). With several processes every one of them stops at the same step, whichever
got the signal and when: JAX's preemption service (on by default in ``jax.distributed``) hears
SIGTERM on any host and agrees with all of them on the next step every host can reach
(``multihost_utils.reached_preemption_sync_point``, asked at every step: a local flag, no
collective), so they save one checkpoint together. A workdir holds one trainer (``train.lock``, taken by process 0); an
unreadable latest checkpoint is reported and set aside, and the newest readable one resumes.
The run ends with an evaluation at every ``eval.loops`` count (the depth curve), printed and
plotted to ``<workdir>/depth_curve.png``.
"""

from __future__ import annotations

import functools
import signal
from typing import Any, Callable

import jax

from mythos_jax import paths
from mythos_jax.checkpoints.training import Checkpointer
from mythos_jax.flop_count import train_flops_per_token
from mythos_jax.parallel.mesh import make_mesh
from mythos_jax.train import data as data_lib
from mythos_jax.train.config import TrainConfig
from mythos_jax.train.evaluate import (depth_curve_table, evaluate, global_batch,
                                       plot_depth_curve)
from mythos_jax.train.metrics import (METRICS_FILE, MetricsLogger, peak_flops_per_device,
                                      print_message, read_metrics_file)
from mythos_jax.train.step import build_plan, init_train_state, make_train_step
from mythos_jax.train.tokenizer import copy_tokenizer
from mythos_jax.train.workdir_lock import WorkdirLock

CONFIG_FILE = "train_config.json"
PLOT_FILE = "depth_curve.png"
PREEMPTED_EXIT = 143        # 128 + SIGTERM: what a shell reports for a run SIGTERM ended


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row."""


def train(cfg: TrainConfig, workdir: str, *, stop_after: int | None = None,
          allow_data_change: bool = False) -> dict[str, Any]:
    """Train (or resume) in ``workdir`` (a local path or a gs:// URL) while holding its lock;
    returns the final metrics and depth curve. ``stop_after``: leave after this many steps of
    this call (tests), checkpointing first. ``allow_data_change``: resume although the training
    corpus changed (the held-out split must not move)."""
    workdir = paths.resolve(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with WorkdirLock(workdir, enabled=jax.process_index() == 0):
        return _train(cfg.with_data_vocab(), workdir, stop_after, allow_data_change)


def _train(cfg: TrainConfig, workdir, stop_after: int | None,
           allow_data_change: bool) -> dict[str, Any]:
    plan = build_plan(cfg, make_mesh(cfg.mesh))
    data_iterator = data_lib.train_iterator(cfg.data, jax.process_index(), jax.process_count())
    checkpointer = Checkpointer(workdir, plan)
    peak, peak_source = peak_flops_per_device(cfg.log.peak_flops)
    logger = MetricsLogger(
        workdir, total_steps=cfg.steps, tokens_per_step=cfg.data.batch_size * cfg.data.seq_len,
        flops_fn=train_flops_fn(plan), peak_flops=peak, tensorboard=cfg.log.tensorboard,
        progress=cfg.log.progress)

    if checkpointer.latest_step() is not None:
        state = checkpointer.restore(data_iterator, set_aside_damaged=True,
                                     allow_data_change=allow_data_change)
        logger.truncate_after(int(state.step))
        print_message(f"resumed from {checkpointer.directory} at step {int(state.step)}")
    else:
        state = init_train_state(plan)
        logger.start_fresh()
        _write_config(cfg, workdir)
        print_message(f"new run in {workdir}: {_describe(plan)}; MFU peak: {peak_source}")

    step_fn = make_train_step(plan)
    stop = preemption_notice()
    step, steps_this_call, summary = int(state.step), 0, {}
    try:
        while step < cfg.steps:
            state, metrics = step_fn(state, global_batch(plan, next(data_iterator)))
            step, steps_this_call = step + 1, steps_this_call + 1
            logger.add(step, metrics)
            preempted = stop.reached(step)
            leaving = preempted or step == cfg.steps or steps_this_call == stop_after
            if step % cfg.log.every == 0 or leaving:
                summary = logger.flush()
                if summary["nonfinite_streak"] >= cfg.optim.max_nonfinite:
                    raise TrainingDiverged(
                        f"{cfg.optim.max_nonfinite} non-finite steps in a row at step {step} "
                        "(each was skipped); lower optim.lr or check the data")
            if step % cfg.checkpoint.every == 0 or leaving:
                logger.sync()        # the logs cover every step the checkpoint holds
                checkpointer.save(step, state, data_iterator)
            if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.steps:
                logger.log_eval(step, _json_keys(evaluate(plan, state)))
            if leaving and step < cfg.steps:
                print_message(f"stopped at step {step}{' (preempted)' if preempted else ''}; "
                              "rerun the same command to resume")
                logger.close()
                return {"step": step, "train": summary, "preempted": preempted}
    finally:
        checkpointer.close()
        stop.restore()
    results = evaluate(plan, state)
    logger.log_eval(step, _json_keys(results))
    logger.close()
    report = {"step": step, "train": summary, "depth_curve": results}
    if jax.process_index() == 0:
        print("depth curve (loss / accuracy by test-time loop count):")
        print(depth_curve_table(results))
        report["plot"] = plot_depth_curve(results, workdir / PLOT_FILE,
                                          title=f"{_describe(plan)}, step {step}")
        print(f"plot written to {report['plot']}")
    return report


def train_flops_fn(plan) -> Callable[[float], float]:
    """loops -> training FLOPs per token of one step (MFU's numerator): the run's model and
    sequence length, truncated backprop's no-grad loops at 1x."""
    return functools.partial(train_flops_per_token, plan.model_cfg, plan.cfg.data.seq_len,
                             backprop_depth=plan.cfg.loops.backprop_depth)


def _describe(plan) -> str:
    cfg, model = plan.cfg, plan.model_cfg
    return (f"dim {model.dim}, {model.attn_type}, {model.n_experts} experts, "
            f"loops {cfg.loops.schedule} (max {cfg.loops.max_loops}, backprop depth "
            f"{cfg.loops.backprop_depth}), data {cfg.data.source} seq {cfg.data.seq_len} x "
            f"batch {cfg.data.batch_size}, mesh {dict(plan.mesh.shape)}")


def _write_config(cfg: TrainConfig, workdir) -> None:
    """The run's config and, for a tokenizer.json vocabulary, a copy of it (``TOKENIZER_FILE``):
    what readers of the workdir need besides the checkpoints."""
    if jax.process_index() == 0:
        paths.write_text(workdir / CONFIG_FILE, cfg.to_json() + "\n")
        copy_tokenizer(data_lib.get_vocab(cfg.data).name, workdir)


def _json_keys(results: dict) -> dict:
    return {split: {str(n): v for n, v in by_loops.items()} for split, by_loops in
            results.items()}


def preemption_notice():
    """Whether to save and leave after a step: ``.reached(step)``, then ``.restore()``. One
    process: its own SIGTERM. Several: the step all of them agreed on through JAX's
    preemption service (its SIGTERM handler must stay installed: no Python handler here)."""
    if jax.process_count() == 1:
        return _SignalFlag()
    from jax._src import distributed
    if distributed.global_state.preemption_sync_manager is None:
        raise ValueError("several processes need JAX's preemption service to stop together "
                           "on SIGTERM: leave jax_enable_preemption_service on")
    return _AgreedStep()


class _SignalFlag:
    """Set by SIGTERM; the loop checkpoints and leaves at the next step boundary."""

    def __init__(self):
        self.raised = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def reached(self, step: int) -> bool:
        return self.raised

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)


class _AgreedStep:
    """True at the step every process agreed on after any of them got SIGTERM."""

    @staticmethod
    def reached(step: int) -> bool:
        from jax.experimental import multihost_utils
        return multihost_utils.reached_preemption_sync_point(step)

    def restore(self) -> None:
        pass


def read_metrics(workdir: str) -> list[dict]:
    """The records of ``<workdir>/metrics.jsonl``."""
    return read_metrics_file(paths.join(workdir, METRICS_FILE))
