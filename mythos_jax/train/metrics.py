"""What a training run shows and records: a progress line, JSON lines, TensorBoard, MFU.

``<workdir>/metrics.jsonl`` gets one line per step (every scalar metric) and one per
evaluation; TensorBoard event files go to ``<workdir>/tensorboard``. Only process 0 writes;
in a bucket both are uploaded as new objects, never rewritten (:mod:`mythos_jax.train.log_files`).
MFU counts loop-aware useful FLOPs (active experts only, the loops drawn that step, truncated
backprop's no-grad loops at 1x; :func:`mythos_jax.flop_count.flops`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

import jax
import numpy as np

from mythos_jax import paths
from mythos_jax.chips import chip
from mythos_jax.train.log_files import EventLog, LineLog, unique_records

METRICS_FILE = "metrics.jsonl"


def peak_flops_per_device(override: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    if override > 0:
        return override, "log.peak_flops"
    kind = jax.devices()[0].device_kind
    figures = chip(kind)
    if figures is not None:
        return figures.peak_bf16_flops, f"datasheet bf16 peak of {kind}"
    if jax.devices()[0].platform == "cpu":
        return _cpu_matmul_flops() / jax.local_device_count(), "measured fp32 matmul of this CPU"
    return math.nan, f"unknown device kind {kind!r} (set log.peak_flops)"


def _cpu_matmul_flops(n: int = 1024, repeats: int = 3) -> float:
    """Best-of-``repeats`` fp32 ``n x n`` matmul FLOP/s on the host (all its cores)."""
    import jax.numpy as jnp
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best


class MetricsLogger:
    """Collects per-step device metrics and writes them every ``log.every`` steps."""

    def __init__(self, workdir: str, *, total_steps: int, tokens_per_step: int,
                 flops_fn, peak_flops: float, tensorboard: bool, progress: bool):
        self.is_writer = jax.process_index() == 0
        self.total_steps, self.tokens_per_step = total_steps, tokens_per_step
        self.flops_fn, self.peak_flops = flops_fn, peak_flops * jax.device_count()
        self.progress = progress and self.is_writer
        self.pending: list[tuple[int, dict]] = []
        self.last_time = self.start_time = time.perf_counter()
        self.lines = LineLog(paths.join(workdir, METRICS_FILE))
        self.tensorboard = None
        if self.is_writer and tensorboard:
            self.tensorboard = EventLog(paths.join(workdir, "tensorboard"))

    def start_fresh(self) -> None:
        """A new run: drop the records of an earlier attempt that ended before its first
        checkpoint (read whole or damaged, they would be logged twice)."""
        if self.is_writer and self.lines.exists():
            self.lines.replace("")

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (a resumed run writes them again) and a
        damaged last line; the log is replaced atomically."""
        if not self.is_writer or not self.lines.exists():
            return
        kept = [r for r in read_metrics_file(self.lines.path) if r.get("step", 0) <= step]
        self.lines.replace("".join(json.dumps(r) + "\n" for r in kept))

    def sync(self) -> None:
        """Upload what a bucket workdir has not received yet (before a checkpoint is saved, so
        that the logs cover every step it holds)."""
        if self.is_writer:
            self.lines.sync()
            if self.tensorboard is not None:
                self.tensorboard.sync()

    def add(self, step: int, metrics: dict) -> None:
        """Queue the metrics of ``step`` (device arrays; no host sync here)."""
        self.pending.append((step, metrics))

    def flush(self) -> dict[str, float]:
        """Fetch the queued steps, write them, print the progress line; the mean of the
        interval's scalars (the longest non-finite streak: its max) with throughput and MFU
        (the FLOPs of each step's own loop count, averaged) is returned."""
        if not self.pending:
            return {}
        rows = [(step, _to_host(metrics)) for step, metrics in jax.device_get(self.pending)]
        self.pending = []
        now = time.perf_counter()
        seconds, self.last_time = now - self.last_time, now
        scalars = [{k: v for k, v in m.items() if np.ndim(v) == 0} for _, m in rows]
        summary = {k: float(np.mean([s[k] for s in scalars])) for k in scalars[-1]}
        summary["nonfinite_streak"] = max(s["nonfinite_streak"] for s in scalars)
        summary["tokens_per_s"] = self.tokens_per_step * len(rows) / seconds
        step_flops = np.mean([self.flops_fn(float(s["loops"])) for s in scalars])
        summary["mfu"] = summary["tokens_per_s"] * step_flops / self.peak_flops
        last_step, last = rows[-1]
        if self.is_writer:
            self.lines.append("".join(json.dumps({"step": step, **_jsonable(metrics)}) + "\n"
                                      for step, metrics in rows), step=rows[0][0])
            if self.tensorboard is not None:
                for name, value in summary.items():
                    self.tensorboard.scalar(f"train/{name}", value, last_step)
                self.tensorboard.histogram("train/expert_load", last["expert_load"], last_step)
                self.tensorboard.flush()
        if self.progress:
            eta = seconds / len(rows) * (self.total_steps - last_step)   # at this interval's pace
            print(progress_line(last_step, self.total_steps, summary, now - self.start_time, eta),
                  flush=True)
        return summary

    def log_eval(self, step: int, results: dict) -> None:
        """Write an evaluation (``{split: {loops: {metric: value}}}``)."""
        if not self.is_writer:
            return
        self.lines.append(json.dumps({"step": step, "eval": results}) + "\n", step=step)
        if self.tensorboard is not None:
            for split, by_loops in results.items():
                for n, values in by_loops.items():
                    for name, value in values.items():
                        self.tensorboard.scalar(f"eval/{split}/{name}@{n}loops", value, step)
            self.tensorboard.flush()

    def close(self) -> None:
        """Upload what is pending and close the TensorBoard writer."""
        if self.is_writer:
            self.lines.sync()
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics_file(path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (with its bucket parts). A damaged last line (a kill
    during a write) is skipped with a warning naming the file; a damaged earlier line is a
    ``ValueError``."""
    lines = LineLog(path)
    if not lines.exists():
        raise FileNotFoundError(f"{path}: no such metrics file")
    return unique_records(lines.read_text(), lines.path)


def progress_line(step: int, total: int, summary: dict[str, float], elapsed: float,
                  eta: float) -> str:
    """One line: bar, step, loss, throughput, MFU, loops, expert load, elapsed time (of this
    process) and ETA, in seconds."""
    width = 20
    done = int(width * step / total)
    bar = "#" * done + "." * (width - done)
    text = (f"[{bar}] step {step}/{total}  loss {summary['loss']:.4f}  "
            f"tok/s {summary['tokens_per_s']:,.0f}  MFU {100 * summary['mfu']:.1f}%  "
            f"loops {summary['loops']:.2f}  load max/mean {summary['load_max_over_mean']:.2f}  "
            f"elapsed {_duration(elapsed)}  ETA {_duration(eta)}")
    if summary["finite"] < 1.0:
        text += "  (non-finite steps skipped)"
    return text


def _duration(seconds: float) -> str:
    """``h:mm:ss`` (``m:ss`` under an hour)."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _to_host(metrics: dict) -> dict:
    return {k: np.asarray(v) for k, v in metrics.items()}


def _jsonable(metrics: dict) -> dict[str, Any]:
    return {k: (v.tolist() if np.ndim(v) else v.item()) for k, v in metrics.items()}


def print_message(text: str) -> None:
    """A line from process 0 only."""
    if jax.process_index() == 0:
        print(text, file=sys.stdout, flush=True)
