"""metrics.jsonl (a damaged last line is skipped with a warning naming the file, an earlier
one is an error naming file and line, the resume rewrite is atomic) and the progress line."""

import json
import os

import pytest

from mythos_jax.train.metrics import MetricsLogger, progress_line, read_metrics_file


def logger(workdir):
    return MetricsLogger(str(workdir), total_steps=10, tokens_per_step=1,
                         flops_fn=lambda loops: 1.0, peak_flops=1.0, tensorboard=False,
                         progress=False)


def write_lines(path, *lines):
    path.write_text("".join(line + "\n" for line in lines))


def test_damaged_last_line_is_skipped_with_a_warning_naming_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_lines(path, json.dumps({"step": 1}), json.dumps({"step": 2}), '{"step": 3, "lo')
    with pytest.warns(UserWarning, match=rf"{path}:3: skipping a damaged last line"):
        assert read_metrics_file(path) == [{"step": 1}, {"step": 2}]


def test_damaged_earlier_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_lines(path, json.dumps({"step": 1}), "garbage", json.dumps({"step": 3}))
    with pytest.raises(ValueError, match=rf"{path}:2: damaged line"):
        read_metrics_file(path)


def test_resume_drops_later_steps_and_the_damaged_line_atomically(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    write_lines(path, json.dumps({"step": 1}), json.dumps({"step": 2, "eval": {}}),
                json.dumps({"step": 3}), '{"step": 4')
    with pytest.warns(UserWarning, match="damaged last line"):
        logger(tmp_path).truncate_after(2)
    assert path.read_text() == '{"step": 1}\n{"step": 2, "eval": {}}\n'
    assert os.listdir(tmp_path) == ["metrics.jsonl"]

    def killed(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", killed)       # a kill between write and rename
    with pytest.raises(KeyboardInterrupt):
        logger(tmp_path).truncate_after(1)
    assert path.read_text() == '{"step": 1}\n{"step": 2, "eval": {}}\n'   # old file intact
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


SUMMARY = {"loss": 2.5, "tokens_per_s": 12345.6, "mfu": 0.4567, "loops": 3.25,
           "load_max_over_mean": 1.5, "finite": 1.0}


def test_progress_line_shows_step_loss_throughput_mfu_loops_elapsed_and_eta():
    line = progress_line(50, 200, SUMMARY, elapsed=75.0, eta=3725.0)
    assert line == ("[#####...............] step 50/200  loss 2.5000  tok/s 12,346  MFU 45.7%  "
                    "loops 3.25  load max/mean 1.50  elapsed 1:15  ETA 1:02:05")
    other = dict(SUMMARY, tokens_per_s=999.4, mfu=0.0123, loops=1.0, finite=0.5)
    line = progress_line(200, 200, other, elapsed=1.0, eta=0.0)
    assert "  tok/s 999  MFU 1.2%  loops 1.00  " in line
    assert line.endswith("ETA 0:00  (non-finite steps skipped)")


def test_mfu_counts_each_step_at_its_own_loops_with_the_runs_flops(tmp_path, monkeypatch,
                                                                     capsys):
    """Two steps drawing 1 and 3 loops under backprop depth 2 in 4 s: tokens/s is
    2 x 256 / 4, and MFU is tokens/s x the mean of the two steps' training FLOPs (not the
    FLOPs of their mean, 2 loops, nor of full backprop) / (peak x devices)."""
    import jax
    import numpy as np

    from mythos_jax.flop_count import flops
    from mythos_jax.parallel.mesh import make_mesh
    from mythos_jax.train import metrics
    from mythos_jax.train.config import load_train_config
    from mythos_jax.train.step import build_plan
    from mythos_jax.train.trainer import train_flops_fn

    plan = build_plan(load_train_config("tiny", ["loops.backprop_depth=2"]),
                      make_mesh("data=1", jax.devices()[:1]))
    clock = iter([100.0, 104.0])        # the logger's start, then the flush
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    peak = 1e8
    log = MetricsLogger(str(tmp_path), total_steps=10, tokens_per_step=256,
                        flops_fn=train_flops_fn(plan), peak_flops=peak, tensorboard=False,
                        progress=True)
    for step, loops in ((1, 1.0), (2, 3.0)):
        log.add(step, {name: np.float32(value) for name, value in (
            ("loss", 2.0), ("loops", loops), ("load_max_over_mean", 1.0), ("finite", 1.0),
            ("nonfinite_streak", 0))})
    summary = log.flush()

    def mfu(*per_step):
        train = [flops(plan.model_cfg, 32, n, backprop_depth)["train"] for n, backprop_depth
                 in per_step]
        return 128.0 * np.mean(train) / (peak * jax.device_count())

    assert summary["tokens_per_s"] == 128.0 and summary["loops"] == 2.0
    assert summary["mfu"] == pytest.approx(mfu((1, 2), (3, 2)), rel=1e-12)
    for wrong in (mfu((2, 2)), mfu((1, None), (3, None))):
        assert summary["mfu"] != pytest.approx(wrong, rel=1e-3)
    assert f"tok/s 128  MFU {100 * summary['mfu']:.1f}%  loops 2.00" in capsys.readouterr().out
