"""One trainer per workdir: a live holder is named and refused, a dead one is taken over (a
lock in a bucket: tests/test_buckets.py)."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from lock_race import race_for_the_lock
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


HOLD = """
import fcntl, json, os, socket, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                         "started": "2026-01-01T00:00:00+00:00"}).encode())
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def holder(tmp_path):
    """A live process holding ``tmp_path``'s lock as a trainer does (flock and record); its
    pid. The lock is dropped when the process ends (``.kill()`` of the returned Popen)."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / LOCK_FILE)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "held\n"
    yield process
    process.kill()
    process.wait()


def test_the_lock_names_its_holder_and_is_released(tmp_path):
    with WorkdirLock(str(tmp_path)):
        record = json.loads((tmp_path / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(WorkdirBusy, match=f"pid {os.getpid()}"):
            WorkdirLock(str(tmp_path)).acquire()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_live_holder_is_refused_and_its_lock_is_free_once_it_is_killed(tmp_path, holder,
                                                                          capsys):
    with pytest.raises(WorkdirBusy, match=rf"in use by another trainer: host .*, pid "
                                          rf"{holder.pid}, started 2026-01-01"):
        WorkdirLock(str(tmp_path)).acquire()
    holder.kill()                        # SIGKILL: no cleanup; the kernel drops the flock
    holder.wait()
    with WorkdirLock(str(tmp_path)):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"gone: host {socket.gethostname()}, pid {holder.pid}" in capsys.readouterr().out


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


def test_processes_other_than_the_first_take_no_lock(tmp_path):
    with WorkdirLock(str(tmp_path), enabled=False):
        assert not (tmp_path / LOCK_FILE).exists()


def test_only_one_of_many_racing_takers_of_a_stale_lock_wins(tmp_path):
    """Eight takers take over one dead trainer's lock at once: exactly one holds it."""
    _write_lock(tmp_path, pid=None)
    won = race_for_the_lock(str(tmp_path), 8)
    assert len(won) == 1
    won[0].release()


def test_a_second_train_command_is_refused_at_once(tmp_path, holder):
    workdir = tmp_path
    live_pid = holder.pid
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
