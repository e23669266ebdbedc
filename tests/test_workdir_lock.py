"""One trainer per workdir: a live holder is named and refused, a dead one is taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from mythos_jax.train.workdir_lock import LOCK_FILE, WorkdirBusy, WorkdirLock


def _write_lock(workdir, **holder):
    record = {"host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00",
              "started_unix": time.time(), **holder}
    (workdir / LOCK_FILE).write_text(json.dumps(record))


@pytest.fixture
def live_pid():
    process = subprocess.Popen(["sleep", "60"])
    yield process.pid
    process.kill()
    process.wait()


def test_the_lock_names_its_holder_and_is_released(tmp_path):
    with WorkdirLock(str(tmp_path)):
        record = json.loads((tmp_path / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(WorkdirBusy, match=f"pid {os.getpid()}"):
            WorkdirLock(str(tmp_path)).acquire()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_live_holder_is_refused(tmp_path, live_pid):
    _write_lock(tmp_path, pid=live_pid)
    with pytest.raises(WorkdirBusy, match=rf"in use by another trainer: host .*, pid "
                                          rf"{live_pid}, started 2026-01-01"):
        WorkdirLock(str(tmp_path)).acquire()


def test_another_hosts_lock_is_never_taken_over(tmp_path):
    _write_lock(tmp_path, host="some-other-host", pid=1)
    with pytest.raises(WorkdirBusy, match="host some-other-host"):
        WorkdirLock(str(tmp_path)).acquire()


@pytest.mark.parametrize("record", ["dead", "reused_pid", "garbage"])
def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, capsys, live_pid, record):
    if record == "dead":
        finished = subprocess.Popen(["true"])
        finished.wait()
        _write_lock(tmp_path, pid=finished.pid)
    elif record == "reused_pid":          # the pid now runs a process younger than the lock
        _write_lock(tmp_path, pid=live_pid, started_unix=time.time() - 3600)
    else:
        (tmp_path / LOCK_FILE).write_text('{"host": ')        # a writer died mid-write
    lock = WorkdirLock(str(tmp_path))
    lock.acquire()
    assert "taking over the lock of a trainer that is gone" in capsys.readouterr().out
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_non_owners_and_remote_workdirs_take_no_lock(tmp_path):
    with WorkdirLock(str(tmp_path), enabled=False):        # processes other than 0
        assert not (tmp_path / LOCK_FILE).exists()
    WorkdirLock("gs://bucket/run").acquire()               # no exclusive create there


def test_a_second_train_command_is_refused_at_once(tmp_path, live_pid):
    workdir = tmp_path / "run"
    workdir.mkdir()
    _write_lock(workdir, pid=live_pid)
    env = {k: v for k, v in os.environ.items() if k != "MYTHOS_JAX_CACHE"}
    result = subprocess.run(
        [sys.executable, "-m", "mythos_jax.cli", "train", "--config", "tiny", "--workdir",
         str(workdir)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        f"error: {workdir} is in use by another trainer: host {socket.gethostname()}, pid "
        f"{live_pid}, started 2026-01-01T00:00:00+00:00 (lock file {workdir / LOCK_FILE}; "
        "remove it only if that process is gone)\n")
    assert sorted(os.listdir(workdir)) == [LOCK_FILE]      # nothing written
