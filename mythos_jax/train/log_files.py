"""The logs a run appends to, ``metrics.jsonl`` and TensorBoard events, on a disk or in a bucket.

    lines = LineLog(workdir / "metrics.jsonl")
    lines.append('{"step": 1}\\n', step=1)
    lines.sync()                    # before each checkpoint and at the end
    text = lines.read_text()

On a local disk lines are appended to the file and TensorBoard writes its event file in place.
Object stores cannot append, and rewriting an object at every flush costs bytes that grow with
the run, so in a bucket every upload is a new object that is never rewritten: metric lines go
to ``metrics.jsonl.parts/<first step>-<time>.jsonl`` (``read_text`` merges them in order),
TensorBoard events to a new event file. Uploads happen at most every ``UPLOAD_EVERY_S`` seconds
and at every ``sync``, so the bytes per step do not depend on the run's length. A failed upload
is retried with backoff; one that still fails is kept for the next sync and reported in one line,
never raised: only process 0 writes logs, so no other host ever waits on one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from typing import Callable

from mythos_jax import paths

UPLOAD_EVERY_S = 60.0
UPLOAD_ATTEMPTS = 4
PARTS_SUFFIX = ".parts"


def upload(write: Callable[[], None], what: str, *, attempts: int = UPLOAD_ATTEMPTS,
           first_wait_s: float = 0.5) -> bool:
    """Run ``write`` until it succeeds, at most ``attempts`` times with doubling waits; on the
    last failure warn naming ``what`` and the error and return False."""
    for attempt in range(attempts):
        try:
            write()
            return True
        except Exception as err:                  # any storage client's transient error
            if attempt == attempts - 1:
                warnings.warn(f"{what}: upload failed {attempts} times ({type(err).__name__}: "
                              f"{err}); kept for the next sync", stacklevel=2)
                return False
            time.sleep(first_wait_s * 2 ** attempt)


class LineLog:
    """An append-only text log at ``path`` (see the module docstring)."""

    def __init__(self, path, *, upload_every_s: float = UPLOAD_EVERY_S):
        self.path = paths.resolve(path)
        self.remote = paths.is_remote(self.path)
        self.parts = self.path.parent / (self.path.name + PARTS_SUFFIX)
        self.upload_every_s = upload_every_s
        self.pending: list[tuple[int, str]] = []      # (step, text) not uploaded yet
        self.last_upload = time.monotonic()

    def append(self, text: str, *, step: int) -> None:
        """Add ``text`` (whole lines) logged at ``step``."""
        if not self.remote:
            with self.path.open("a") as f:
                f.write(text)
            return
        self.pending.append((step, text))
        if time.monotonic() - self.last_upload >= self.upload_every_s:
            self.sync()

    def sync(self) -> None:
        """Upload what is pending as one new object (a no-op locally or with nothing pending)."""
        if not self.pending:
            return
        first_step = self.pending[0][0]
        name = f"{first_step:012d}-{time.time_ns():020d}.jsonl"
        text = "".join(t for _, t in self.pending)
        if upload(lambda: (self.parts / name).write_text(text), str(self.parts / name)):
            self.pending = []
        self.last_upload = time.monotonic()

    def read_text(self) -> str:
        """The whole log: the file, then the uploaded parts in order, then what is pending."""
        text = self.path.read_text() if self.path.exists() else ""
        if self.parts.exists():
            for part in sorted(self.parts.iterdir(), key=lambda p: p.name):
                text += part.read_text()
        return text + "".join(t for _, t in self.pending)

    def exists(self) -> bool:
        return self.path.exists() or self.parts.exists() or bool(self.pending)

    def replace(self, text: str) -> None:
        """Make ``text`` the whole log (written atomically, then the parts it absorbed are
        deleted; a kill between the two leaves duplicate lines, which readers drop)."""
        self.pending = []
        paths.write_text(self.path, text)
        if self.parts.exists():
            self.parts.rmtree()


class EventLog:
    """TensorBoard events under ``folder``: written in place locally; in a bucket staged in a
    local folder and uploaded as a new event file at every ``sync`` (at most every
    ``upload_every_s`` seconds otherwise)."""

    def __init__(self, folder, *, upload_every_s: float = UPLOAD_EVERY_S):
        self.folder = paths.resolve(folder)
        self.remote = paths.is_remote(self.folder)
        self.staging = tempfile.mkdtemp(prefix="mythos-tensorboard-") if self.remote else None
        self.upload_every_s, self.last_upload, self.files = upload_every_s, time.monotonic(), 0
        self.writer = None

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._writer().add_scalar(tag, value, step)

    def histogram(self, tag: str, values, step: int) -> None:
        self._writer().add_histogram(tag, values, step)

    def flush(self) -> None:
        """Make what was logged visible: locally at once, in a bucket at the next upload."""
        if self.writer is None:
            return
        if not self.remote:
            self.writer.flush()
        elif time.monotonic() - self.last_upload >= self.upload_every_s:
            self.sync()

    def sync(self) -> None:
        """Close the staged event file and upload every staged file not uploaded yet."""
        if not self.remote:
            self.flush()
            return
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        for name in sorted(os.listdir(self.staging)):
            local = os.path.join(self.staging, name)
            with open(local, "rb") as f:
                data = f.read()
            if upload(lambda: (self.folder / name).write_bytes(data), str(self.folder / name)):
                os.remove(local)
        self.last_upload = time.monotonic()

    def close(self) -> None:
        self.sync()
        if self.writer is not None:
            self.writer.close()
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)

    def _writer(self):
        if self.writer is None:
            from tensorboardX import SummaryWriter
            self.files += 1
            self.writer = SummaryWriter(self.staging or str(self.folder),
                                        filename_suffix=f".{self.files}")
        return self.writer


def unique_records(text: str, path) -> list[dict]:
    """The JSON records of a log's lines with exact repeats dropped (a replace interrupted
    between its two writes); a damaged last line is skipped with a warning naming ``path``,
    a damaged earlier line is a ``ValueError``."""
    lines = text.splitlines()
    records, seen = [], set()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise ValueError(f"{path}:{number}: damaged line ({err.msg})") from None
            warnings.warn(f"{path}:{number}: skipping a damaged last line (an interrupted "
                          f"write): {line[:60]!r}", stacklevel=3)
            continue
        key = json.dumps(record, sort_keys=True)
        if key not in seen:
            seen.add(key)
            records.append(record)
    return records
