"""Training checkpoints that cannot be read or written: named, never lost, never a restart
from scratch over an existing run; a save killed mid-write never listed; a resume on fewer
devices resharded."""

import asyncio
import errno
import glob
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler

from mythos_jax.checkpoints.training import Checkpointer
from mythos_jax.cli import main
from mythos_jax.parallel.mesh import make_mesh
from mythos_jax.train import data
from mythos_jax.train.config import load_train_config
from mythos_jax.train.step import build_plan
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


@pytest.fixture
def failing_reads(monkeypatch):
    """``fail(error, times)``: Orbax's restore raises ``error`` the next ``times`` calls,
    then reads; the retry waits are shortened. Returns how many calls were made."""
    from orbax.checkpoint import CheckpointManager
    from mythos_jax.checkpoints import training

    monkeypatch.setattr(training, "RETRY_SECONDS", 0.01)
    real, calls = CheckpointManager.restore, []

    def fail(error, times):
        def restore(manager, *args, **kwargs):
            calls.append(1)
            if len(calls) <= times:
                raise error
            return real(manager, *args, **kwargs)
        monkeypatch.setattr(CheckpointManager, "restore", restore)
        return calls
    return fail


def test_a_transient_read_error_is_retried_and_moves_nothing(run, capsys, failing_reads):
    calls = failing_reads(ValueError("UNAVAILABLE: connection reset by peer"), times=2)
    report = train(load_train_config("tiny", QUICK + ["steps=6"]), str(run))
    err = capsys.readouterr().err
    assert err.count("failed (ValueError: UNAVAILABLE: connection reset by peer); retrying") == 2
    assert len(calls) > 2 and report["step"] == 6 and _steps(run) == [4, 6]
    assert "resumed" not in err and not os.path.exists(os.path.join(run, "damaged_checkpoints"))
    steps = [line["step"] for line in read_metrics(str(run)) if "eval" not in line]
    assert steps == [1, 2, 3, 4, 5, 6]                      # resumed at 4, nothing lost


@pytest.mark.parametrize("error, tries", [
    (OSError(errno.EIO, "Input/output error"), 4),          # storage: retried, then a stop
    (PermissionError(errno.EACCES, "Permission denied"), 1),  # access: no retry
    (ValueError("Unsupported checkpoint format version 9"), 1),  # not judged as damage
])
def test_a_read_error_that_is_not_damage_stops_the_run_naming_it(run, capsys, failing_reads,
                                                                 error, tries):
    calls = failing_reads(error, times=10)
    metrics = open(os.path.join(run, "metrics.jsonl")).read()
    assert main(["train", "--config", "tiny", "--workdir", str(run)]
                + [a for o in QUICK + ["steps=6"] for a in ("--set", o)]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"error: checkpoint step 4 at {run}/checkpoints/4 could not be read"
                           + (f" (tried {tries} times)" if tries > 1 else "") + ": ")
    assert "nothing was moved" in last and len(calls) == tries
    assert _steps(run) == [2, 4] and not os.path.exists(os.path.join(run, "damaged_checkpoints"))
    assert open(os.path.join(run, "metrics.jsonl")).read() == metrics


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


def _json_save_at(step, action):
    """Orbax's JSON item writer, running ``await action(directory)`` first for the items of
    checkpoint ``step`` (written in its temporary ``<step>.orbax-checkpoint-tmp``)."""
    original = handler.JsonCheckpointHandler._save_fn

    async def save_fn(self, x, directory):
        if os.path.basename(os.path.dirname(str(directory))).startswith(f"{step}."):
            await action(directory)
        return await original(self, x, directory)
    return save_fn


def test_a_full_disk_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path, capsys,
                                                                     monkeypatch):
    original = handler.JsonCheckpointHandler._save_fn

    async def disk_full(directory):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))

    monkeypatch.setattr(handler.JsonCheckpointHandler, "_save_fn", _json_save_at(4, disk_full))
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


def _save_step_6_and_hang(run, marker):
    """(In a subprocess.) Restore ``run``'s latest checkpoint and save it as step 6, hanging
    in the middle of that save (``marker`` created first) until the process is killed."""
    async def hang(directory):
        Path(marker).touch()
        await asyncio.Event().wait()

    handler.JsonCheckpointHandler._save_fn = _json_save_at(6, hang)
    cfg = load_train_config("tiny", QUICK + ["steps=6"])
    checkpointer = Checkpointer(run, build_plan(cfg, make_mesh(cfg.mesh)))
    iterator = data.train_iterator(cfg.data)
    checkpointer.save(6, checkpointer.restore(iterator), iterator)


def test_a_save_killed_mid_write_is_never_listed_and_step_4_resumes(run, tmp_path):
    """SIGKILL while checkpoint 6 is being written: its temporary directory stays behind,
    partly written, but is never listed; step 4 is restored, and step 6 can be written again."""
    marker = tmp_path / "saving"
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "from test_checkpoints_training import _save_step_6_and_hang; "
            f"_save_step_6_and_hang({str(run)!r}, {str(marker)!r})")
    env = {k: v for k, v in os.environ.items() if k != "MYTHOS_JAX_CACHE"}   # it is killed
    log = tmp_path / "saver.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    partial = os.path.join(run, "checkpoints", "6.orbax-checkpoint-tmp")
    assert os.listdir(partial) and _steps(run) == [2, 4]

    cfg = load_train_config("tiny", QUICK + ["steps=6"])
    checkpointer = Checkpointer(str(run), build_plan(cfg, make_mesh(cfg.mesh)))
    assert checkpointer.manager.all_steps() == [2, 4] and checkpointer.latest_step() == 4
    iterator = data.train_iterator(cfg.data)
    state = checkpointer.restore(iterator)
    assert int(state.step) == 4
    checkpointer.save(6, state, iterator)
    checkpointer.close()
    assert _steps(run) == [4, 6] and not os.path.exists(partial)


def test_a_checkpoint_of_8_devices_resumes_resharded_on_4(run, capsys, monkeypatch):
    """The trainer resuming on 4 devices (fsdp=2, tensor=2) the run written on 8 (data=8):
    the state it restores holds the saved values bit for bit, in the 4-device shardings, and
    its depth curve on the 4 devices is the one the 8 computed."""
    from mythos_jax.train import trainer

    four = jax.devices()[:4]
    cfg = load_train_config("tiny", QUICK + ["steps=4", "mesh=fsdp=2,tensor=2"])
    plan = build_plan(cfg, make_mesh(cfg.mesh, four))
    restored = []

    class Recording(Checkpointer):
        def restore(self, *args, **kwargs):
            state = super().restore(*args, **kwargs)
            restored.append((jax.tree.map(lambda x: x.sharding, state),
                             jax.tree.map(np.array, state)))
            return state

    [curve_on_8] = [line["eval"] for line in read_metrics(str(run)) if "eval" in line]
    monkeypatch.setattr(trainer, "make_mesh", lambda spec: make_mesh(spec, four))
    monkeypatch.setattr(trainer, "Checkpointer", Recording)
    report = train(cfg, str(run))
    assert f"resumed from {run}/checkpoints at step 4\n" in capsys.readouterr().out
    (shardings, values), = restored
    for got, want in zip(jax.tree.leaves(shardings), jax.tree.leaves(plan.shardings),
                         strict=True):
        assert got == want and got.mesh.devices.size == 4
    assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(shardings))
    saved_on = load_train_config("tiny", QUICK + ["steps=4"])
    checkpointer = Checkpointer(str(run), build_plan(saved_on, make_mesh(saved_on.mesh)))
    saved = checkpointer.restore(step=4)
    checkpointer.close()
    assert {len(x.sharding.device_set) for x in jax.tree.leaves(saved)} == {8}
    for got, want in zip(jax.tree.leaves(values), jax.tree.leaves(saved), strict=True):
        want = np.asarray(want)
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
    for name, value in curve_on_8["heldout"]["1"].items():
        np.testing.assert_allclose(report["depth_curve"]["heldout"][1][name], value, rtol=1e-5)
