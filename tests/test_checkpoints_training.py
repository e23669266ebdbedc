"""Training checkpoints that cannot be read or written: named, never lost, never a restart
from scratch over an existing run."""

import errno
import glob
import os
import shutil

import pytest

from mythos_jax.cli import main
from mythos_jax.train.config import load_train_config
from mythos_jax.train.trainer import read_metrics, train

QUICK = ["checkpoint.every=2", "log.every=2", "log.tensorboard=false", "eval.loops=[1]",
         "eval.batches=1", "checkpoint.async_save=false"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 4-step run of the tiny preset: checkpoints at steps 2 and 4."""
    path = str(tmp_path_factory.mktemp("train") / "run")
    train(load_train_config("tiny", QUICK + ["steps=4"]), path)
    return path


@pytest.fixture
def run(finished_run, tmp_path):
    """A private copy of ``finished_run``."""
    return shutil.copytree(finished_run, tmp_path / "run")


def _damage(run, step, part):
    """Truncate the JSON config or every array file of checkpoint ``step``."""
    checkpoint = os.path.join(run, "checkpoints", str(step))
    if part == "json":
        files = [os.path.join(checkpoint, "config", "metadata")]
    else:
        files = [f for f in glob.glob(os.path.join(checkpoint, "state", "**", "d", "*"),
                                      recursive=True) if os.path.isfile(f)]
    for path in files:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    return checkpoint


def _steps(run):
    return sorted(int(n) for n in os.listdir(os.path.join(run, "checkpoints")) if n.isdigit())


@pytest.mark.parametrize("part", ["json", "arrays"])
def test_an_unreadable_latest_checkpoint_is_named_and_the_run_resumes_before_it(
        run, capsys, part):
    damaged = _damage(run, 4, part)
    report = train(load_train_config("tiny", QUICK + ["steps=6"]), str(run))
    err = capsys.readouterr().err
    assert f"warning: checkpoint step 4 at {damaged} cannot be read: " in err
    assert "using step 2, the newest readable checkpoint" in err
    assert f"moved the unreadable checkpoint step 4 to {run}/damaged_checkpoints/4-" in err
    assert report["step"] == 6 and _steps(run) == [4, 6]          # step 4 written again
    steps = [line["step"] for line in read_metrics(str(run)) if "eval" not in line]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_readers_fall_back_or_name_the_damaged_step(run, tmp_path, capsys):
    damaged = _damage(run, 4, "json")
    assert main(["eval", "--workdir", str(run), "--batches", "1"]) == 0
    captured = capsys.readouterr()
    assert "checkpoint step 2" in captured.out and "step 4" in captured.err
    for argv in (["convert", str(run), str(tmp_path / "out.pt"), "--step", "4"],
                 ["generate", "--checkpoint", damaged, "--prompt", "hi"],
                 ["eval", "--workdir", str(run), "--step", "4"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"error: checkpoint step 4 at {damaged} cannot be read: "
                              "JSONDecodeError: ") and err.count("\n") == 1, argv
    assert _steps(run) == [2, 4]                                   # readers move nothing


def test_no_readable_checkpoint_is_refused_with_the_steps_found(run, capsys):
    for step in (2, 4):
        _damage(run, step, "json")
    metrics = open(os.path.join(run, "metrics.jsonl")).read()
    assert main(["train", "--config", "tiny", "--workdir", str(run)]
                + [a for o in QUICK + ["steps=6"] for a in ("--set", o)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (f"error: no readable checkpoint in {run}/checkpoints (steps found: 2, 4; "
                       "see the warnings above)")
    assert _steps(run) == [2, 4] and not os.path.exists(os.path.join(run, "damaged_checkpoints"))
    assert open(os.path.join(run, "metrics.jsonl")).read() == metrics     # no fresh start


def test_a_full_disk_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path, capsys,
                                                                     monkeypatch):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler

    original = handler.JsonCheckpointHandler._save_fn

    async def disk_full_at_step_4(self, x, directory):
        if os.path.basename(os.path.dirname(str(directory))).startswith("4."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await original(self, x, directory)

    monkeypatch.setattr(handler.JsonCheckpointHandler, "_save_fn", disk_full_at_step_4)
    run = tmp_path / "run"
    argv = ["train", "--config", "tiny", "--workdir", str(run), "--set", "steps=6",
            "--set", "checkpoint.async_save=true"] + [a for o in QUICK[:-1]
                                                      for a in ("--set", o)]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == (f"error: saving checkpoint step 4 in {run}/checkpoints failed (no space left "
                   "on device); the previous checkpoint (step 2) is intact; free space (or fix "
                   "the permissions) and rerun the same command to resume")
    assert _steps(run) == [2]

    monkeypatch.setattr(handler.JsonCheckpointHandler, "_save_fn", original)   # space freed
    assert main(argv) == 0
    assert "resumed from" in capsys.readouterr().out and _steps(run) == [4, 6]
