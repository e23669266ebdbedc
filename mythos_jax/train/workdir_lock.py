"""One trainer per workdir: ``<workdir>/train.lock`` names its holder (host, pid, start).

    with WorkdirLock(workdir):       # WorkdirBusy if a live trainer holds it
        ...

The file is created with ``O_CREAT | O_EXCL`` (atomic on a local or NFS-v3+ disk). A lock of
a process that is gone (same host, and its pid not running, or running a process started
after the lock was taken: the pid was reused, e.g. after a reboot) is taken over with a
message; a lock from another host is never taken over (its liveness cannot be checked here). Remote
workdirs (``gs://...``) are not locked: object stores offer no exclusive create.
"""

from __future__ import annotations

import datetime
import json
import os
import socket

LOCK_FILE = "train.lock"


class WorkdirBusy(RuntimeError):
    """Another live trainer holds the workdir."""


class WorkdirLock:
    """A context manager around :meth:`acquire` / :meth:`release`."""

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
        workdir = os.fspath(workdir)
        self.path = os.path.join(workdir, LOCK_FILE)
        self.enabled = enabled and "://" not in workdir
        self.held = False

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise ``WorkdirBusy`` naming its live holder."""
        if not self.enabled:
            return
        now = datetime.datetime.now().astimezone()
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": now.isoformat(timespec="seconds"), "started_unix": now.timestamp()}
        while not self._create(me):
            holder = self._holder()
            if holder is None:          # released (or unreadable) meanwhile: try again
                continue
            if holder.get("host") != me["host"] or _alive(holder):
                raise WorkdirBusy(
                    f"{os.path.dirname(self.path)} is in use by another trainer: "
                    f"{_describe(holder)} (lock file {self.path}; remove it only if that "
                    "process is gone)")
            print(f"taking over the lock of a trainer that is gone: {_describe(holder)}",
                  flush=True)
            os.remove(self.path)
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            os.remove(self.path)

    def _create(self, me: dict) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return True

    def _holder(self) -> dict | None:
        """The holder's record; an unreadable record (a writer died mid-write) is stale."""
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {"host": socket.gethostname(), "pid": None, "started": "?"}


def _alive(holder: dict) -> bool:
    """Whether the holder's pid runs a process that may be the holder (started before the
    lock was taken; a second of slack for the clock's resolution)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # exists, owned by another user
        pass
    started, taken = _process_start(pid), holder.get("started_unix")
    return started is None or not isinstance(taken, (int, float)) or started <= taken + 1.0


def _process_start(pid: int) -> float | None:
    """Start time (Unix seconds) of ``pid`` from ``/proc`` (Linux); None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])    # field 22: starttime
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _describe(holder: dict) -> str:
    return (f"host {holder.get('host')}, pid {holder.get('pid')}, started "
            f"{holder.get('started')}")
