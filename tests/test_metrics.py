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


SUMMARY = {"loss": 2.5, "tokens_per_s": 1234.0, "mfu": 0.1, "loops": 2.0,
           "load_max_over_mean": 1.5, "finite": 1.0}


def test_progress_line_shows_elapsed_time_and_eta():
    line = progress_line(50, 200, SUMMARY, elapsed=75.0, eta=3725.0)
    assert line.startswith("[#####...............] step 50/200  loss 2.5000")
    assert line.endswith("elapsed 1:15  ETA 1:02:05")
