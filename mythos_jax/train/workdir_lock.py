"""One trainer per workdir: ``<workdir>/train.lock`` names its holder (host, pid, start).

    with WorkdirLock(workdir):       # WorkdirBusy if a live trainer holds it
        ...

On a disk the holder keeps an exclusive ``flock`` on the file for the whole run. The kernel
drops it when the process dies, however it dies, so a free file lock means the holder is gone
and taking it over is atomic (no check-then-remove). A record left by another host is still
refused: its flock may not reach this host (NFS mounted ``nolock``).

In a bucket (``gs://``) the lock is an object created only if absent (GCS precondition
``ifGenerationMatch=0``), and the holder rewrites it every ``HEARTBEAT_S`` seconds. It is stale,
and taken over by replacing that very generation (so two takers cannot both win), when its
holder ran on this host and is gone, or its last heartbeat is older than ``STALE_AFTER_S`` (a
preempted slice's hosts are gone, and the new ones have other names).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import threading
import time
import warnings

from mythos_jax import paths

LOCK_FILE = "train.lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0


class WorkdirBusy(RuntimeError):
    """Another live trainer holds the workdir."""


class WorkdirLock:
    """A context manager around :meth:`acquire` / :meth:`release`."""

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
        self.path = os.fspath(paths.join(workdir, LOCK_FILE))
        self.enabled = enabled
        self.held = None            # the _FileLock or _BucketLock while held

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise ``WorkdirBusy`` naming its live holder."""
        if not self.enabled:
            return
        lock = (_BucketLock if paths.is_remote(self.path) else _FileLock)(self.path)
        gone = lock.take(_my_record())
        if gone is not None:
            print(f"taking over the lock of a trainer that is gone: {_describe(gone)}",
                  flush=True)
        self.held = lock

    def release(self) -> None:
        if self.held is not None:
            self.held.release()
            self.held = None


class _FileLock:
    """``flock`` on a local lock file."""

    def __init__(self, path: str):
        self.path, self.fd = path, None

    def take(self, me: dict) -> dict | None:
        """Hold the lock with ``me`` written in it; the record of a holder that is gone (or
        None); ``WorkdirBusy`` for a live holder or another host's record."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise _busy(_parse(_read_file(self.path)), self.path) from None
            if not _same_file(fd, self.path):      # released and removed meanwhile: again
                os.close(fd)
                continue
            previous = _parse(os.pread(fd, 1 << 16, 0))
            if previous is not None and previous.get("host") != me["host"]:
                os.close(fd)
                raise _busy(previous, self.path)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
            self.fd = fd
            return previous

    def release(self) -> None:
        os.remove(self.path)            # while still holding it: the next taker sees a new file
        os.close(self.fd)


class _BucketLock:
    """A GCS object created and replaced under generation preconditions, kept fresh by a
    heartbeat thread."""

    def __init__(self, url: str):
        from google.cloud import storage
        bucket, _, name = url.removeprefix("gs://").partition("/")
        self.url, self.bucket = url, storage.Client().bucket(bucket)
        self.blob = self.bucket.blob(name)
        self.generation, self.record = None, None
        self.stop = threading.Event()
        self.heartbeat = threading.Thread(target=self._beat, daemon=True)

    def take(self, me: dict) -> dict | None:
        from google.api_core.exceptions import NotFound, PreconditionFailed
        holder = None
        while not self._write(me, expected=0):
            current = self.bucket.get_blob(self.blob.name)
            if current is None:
                continue                              # released meanwhile: try again
            try:
                holder = _parse(current.download_as_bytes(if_generation_match=current.generation))
            except (NotFound, PreconditionFailed):
                continue                              # changed meanwhile: look again
            holder = holder or {"host": "?", "pid": None, "started": "?"}
            if not _stale(holder, me):
                raise _busy(holder, self.url)
            if self._write(me, expected=current.generation):
                break
            holder = None
        self.heartbeat.start()
        return holder

    def release(self) -> None:
        from google.api_core.exceptions import NotFound, PreconditionFailed
        self.stop.set()
        self.heartbeat.join()
        try:
            self.blob.delete(if_generation_match=self.generation)
        except (NotFound, PreconditionFailed):
            pass                                      # taken over: not ours to delete

    def _write(self, record: dict, *, expected: int) -> bool:
        """Write ``record`` if the object's generation is ``expected`` (0: absent)."""
        from google.api_core.exceptions import PreconditionFailed
        try:
            self.blob.upload_from_string(json.dumps(record), content_type="application/json",
                                         if_generation_match=expected)
        except PreconditionFailed:
            return False
        self.generation, self.record = self.blob.generation, record
        return True

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                alive = self._write({**self.record, "heartbeat_unix": time.time()},
                                    expected=self.generation)
            except Exception as err:                  # transient: the next beat tries again
                warnings.warn(f"{self.url}: heartbeat failed ({err}); trying again in "
                              f"{HEARTBEAT_S:.0f} s", stacklevel=1)
                continue
            if not alive:
                warnings.warn(f"{self.url}: another trainer took this workdir's lock over "
                              "(this one missed its heartbeats); stop this run", stacklevel=1)
                return


def _my_record() -> dict:
    now = datetime.datetime.now().astimezone()
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": now.isoformat(timespec="seconds"), "started_unix": now.timestamp(),
            "heartbeat_unix": now.timestamp()}


def _parse(data: bytes) -> dict | None:
    """A lock record; None for an empty file; a record of this host with no pid for an
    unreadable one (a writer died mid-write)."""
    if not data.strip():
        return None
    try:
        record = json.loads(data)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        return {"host": socket.gethostname(), "pid": None, "started": "?"}
    return record


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _stale(holder: dict, me: dict) -> bool:
    """Whether a bucket lock's holder is gone: on this host with its process gone, or silent
    for longer than ``STALE_AFTER_S``."""
    if holder.get("host") == me["host"] and not _alive(holder):
        return True
    beat = holder.get("heartbeat_unix", holder.get("started_unix"))
    return not isinstance(beat, (int, float)) or time.time() - beat > STALE_AFTER_S


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


def _busy(holder: dict | None, where: str) -> WorkdirBusy:
    holder = holder or {"host": "?", "pid": "?", "started": "?"}
    return WorkdirBusy(f"{os.path.dirname(where)} is in use by another trainer: "
                       f"{_describe(holder)} (lock file {where}; remove it only if that "
                       "process is gone)")


def _describe(holder: dict) -> str:
    return (f"host {holder.get('host')}, pid {holder.get('pid')}, started "
            f"{holder.get('started')}")
