"""Orbax checkpoints of a training run: ``<workdir>/checkpoints/<step>/``.

Each checkpoint holds the ``TrainState`` (parameters, buffers, optimizer state, step), the data
iterator's position (``get_state()`` as JSON: it counts global batches, so it is the same on
every process and valid for any process count) and the ``TrainConfig`` as JSON. Saves are
asynchronous and atomic (Orbax writes a temporary directory and renames it when complete; an
interrupted save is never picked up). Restoring
takes the target shardings from the current plan, so a checkpoint written on one mesh or
device count is resharded onto another. The model and data sections must match the saved
ones, and so must the data itself (``fingerprint.py``: files, token and window counts, the
split); a mismatch raises ``ValueError`` naming what differs. ``allow_data_change`` accepts a
changed training corpus, never a moved held-out split. A checkpoint whose *content* is
invalid (unparsable or missing metadata, missing or short array files: ``read_failure``) is
named (step, path, why) and the newest readable one is used instead; a read that fails for any
other reason (a network or storage error: retried ``READ_ATTEMPTS`` times with backoff; a
permission; an Orbax version) raises ``CheckpointReadError`` and moves nothing. A failed save
(full disk) raises ``CheckpointSaveError`` and leaves the earlier checkpoints as they were.
"""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mythos_jax import paths
from mythos_jax.errors import CommandError
from mythos_jax.train.config import TrainConfig
from mythos_jax.train.fingerprint import data_changes, data_fingerprint, heldout_moved
from mythos_jax.train.optim import build_optimizer
from mythos_jax.train.step import TrainPlan, TrainState

CHECKPOINT_DIR = "checkpoints"
FINGERPRINT_ITEM = "fingerprint"
JSON_ITEM_FILE = "metadata"  # where Orbax's JsonCheckpointHandler puts an item's JSON
DAMAGED_DIR = "damaged_checkpoints"
# Data fields that may change between a run and its resumption without moving the stream.
DATA_FIELDS_FREE_TO_CHANGE = ("prefetch",)


READ_ATTEMPTS = 4           # reads of a checkpoint tried on a transient error
RETRY_SECONDS = 1.0         # the first wait between them, doubled after each
# absl status codes (TensorStore's errors start with one) that mean the stored bytes are bad
CONTENT_CODES = ("NOT_FOUND", "OUT_OF_RANGE", "DATA_LOSS")
TRANSIENT_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED",
                   "CANCELLED", "INTERNAL")


class UnreadableCheckpoint(ValueError):
    """A checkpoint whose content is invalid (truncated, corrupt, missing files)."""


class CheckpointReadError(CommandError):
    """A checkpoint that could not be read for a reason other than its content (storage or
    network, permission, version); nothing was moved."""


class CheckpointSaveError(RuntimeError):
    """A save that failed (full disk, lost permission); the previous checkpoint is intact."""


class Checkpointer:
    """Save / restore a run's checkpoints; a thin layer over ``ocp.CheckpointManager``."""

    def __init__(self, workdir: str, plan: TrainPlan):
        self.plan = plan
        self.directory = paths.join(workdir, CHECKPOINT_DIR)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=plan.cfg.checkpoint.keep,
            enable_async_checkpointing=plan.cfg.checkpoint.async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._fingerprint = None
        self.pending_step: int | None = None
        self.failed = False

    @property
    def fingerprint(self) -> dict[str, Any]:
        """The data fingerprint of the plan's config (computed once)."""
        if self._fingerprint is None:
            self._fingerprint = data_fingerprint(self.plan.cfg.data)
        return self._fingerprint

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_iterator, *, force: bool = False) -> None:
        """Start an asynchronous save of ``state`` and the iterator position at ``step``
        (after the previous save has finished: its failure is reported as its own)."""
        self.wait()
        self.pending_step = step
        self._saving(lambda: self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state._asdict()),
            data=ocp.args.JsonSave(data_iterator.get_state()),
            config=ocp.args.JsonSave(self.plan.cfg.to_dict()),
            **{FINGERPRINT_ITEM: ocp.args.JsonSave(self.fingerprint)}), force=force))

    def _saving(self, write) -> None:
        """``write()``; a failure becomes ``CheckpointSaveError`` naming the step being saved
        and the checkpoint that is still intact."""
        try:
            write()
        except Exception as err:
            self.failed = True
            done = [s for s in self.manager.all_steps() if s != self.pending_step]
            kept = (f"the previous checkpoint (step {max(done)}) is intact" if done else
                    "no earlier checkpoint exists")
            why = ("no space left on device" if "No space left on device" in str(err)
                   else _first_line(err))
            raise CheckpointSaveError(
                f"saving checkpoint step {self.pending_step} in {self.directory} failed "
                f"({why}); {kept}; free space (or fix the permissions) and rerun the same "
                "command to resume") from err

    def restore(self, data_iterator=None, step: int | None = None, *,
                set_aside_damaged: bool = False, allow_data_change: bool = False) -> TrainState:
        """The state at ``step`` in the plan's shardings; ``data_iterator`` (if given: training
        resumes) is moved to the saved position after the data is checked (``check_data``). Without ``step``: the newest readable checkpoint, each
        unreadable newer one reported (and, with ``set_aside_damaged``, moved to
        ``<workdir>/damaged_checkpoints/`` so that the run can write its step again).
        ``UnreadableCheckpoint`` names the step, the path and why; a changed corpus raises
        ``ValueError`` unless ``allow_data_change`` (``check_data``)."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(f"no checkpoint step {step} in {self.directory} "
                                        f"(steps: {', '.join(map(str, sorted(steps)))})")
            return self._restore(step, data_iterator, allow_data_change)
        for index, candidate in enumerate(steps):
            try:
                state = self._restore(candidate, data_iterator, allow_data_change)
            except UnreadableCheckpoint as err:
                _warn(f"warning: {err}")
                continue
            if index:
                _warn(f"using step {candidate}, the newest readable checkpoint")
                for damaged in steps[:index] if set_aside_damaged else ():
                    self._set_aside(damaged)
            return state
        raise UnreadableCheckpoint(f"no readable checkpoint in {self.directory} (steps found: "
                                   f"{', '.join(map(str, sorted(steps)))}; see the warnings "
                                   "above)")

    def _restore(self, step: int, data_iterator, allow_data_change: bool) -> TrainState:
        saved = self._read(step, lambda: self.saved_config(step))
        check_compatible(saved, self.plan.cfg)
        self._check_optimizer_state(saved)
        if data_iterator is not None:       # training resumes: the data must be the same
            self.check_data(step, allow_data_change)
        target = jax.tree.map(
            lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype,
                                                         sharding=sharding),
            self.plan.abstract_state._asdict(), self.plan.shardings._asdict())
        items = {"state": ocp.args.StandardRestore(target)}
        if data_iterator is not None:
            items["data"] = ocp.args.JsonRestore()
        restored = self._read(step, lambda: self.manager.restore(
            step, args=ocp.args.Composite(**items)))
        if data_iterator is not None:
            data_iterator.set_state(restored["data"])
        return TrainState(**restored["state"])

    def _check_optimizer_state(self, saved: dict[str, Any]) -> None:
        """``ValueError`` naming the ``optim`` fields that differ when the saved config's
        optimizer state has another structure than the plan's (e.g. clipping turned off)."""
        saved_cfg = TrainConfig.from_dict(saved)
        optimizer = build_optimizer(saved_cfg.optim, saved_cfg.steps)
        saved_tree = jax.eval_shape(optimizer.init, self.plan.abstract_state.params)
        if jax.tree.structure(saved_tree) == jax.tree.structure(
                self.plan.abstract_state.opt_state):
            return
        old, new = saved.get("optim", {}), self.plan.cfg.to_dict()["optim"]
        changed = [f"optim.{name}: checkpoint {old.get(name)!r}, config {new.get(name)!r}"
                   for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
        raise ValueError("the checkpoint's optimizer state has another structure than this "
                         f"config's ({'; '.join(changed) or 'optim'}): use a new workdir, or "
                         "restore the original settings")

    def _read(self, step: int, read):
        """``read()``, tried again after a transient failure; invalid content becomes
        ``UnreadableCheckpoint``, any other failure ``CheckpointReadError``, both naming the
        step. With several processes they agree: the worst outcome of any is everyone's."""
        where = f"checkpoint step {step} at {self.directory / str(step)}"
        delay = RETRY_SECONDS
        for attempt in range(1, READ_ATTEMPTS + 1):
            try:
                result, failure, kind = read(), None, "ok"
            except Exception as err:
                result, failure, kind = None, err, read_failure(err)
            kind = _agreed(kind)
            if kind == "ok":
                return result
            why = _first_line(failure) if failure else "failed on another process"
            if kind == "content":
                raise UnreadableCheckpoint(f"{where} cannot be read: {why}") from failure
            if kind != "transient" or attempt == READ_ATTEMPTS:
                tries = f" (tried {attempt} times)" if attempt > 1 else ""
                raise CheckpointReadError(
                    f"{where} could not be read{tries}: {why}; its content was not judged and "
                    "nothing was moved: fix the storage or its access and rerun") from failure
            _warn(f"warning: reading {where} failed ({why}); retrying in {delay:g} s")
            time.sleep(delay)
            delay *= 2

    def _set_aside(self, step: int) -> None:
        """Move an unreadable step out of the way (process 0), so that it is not retried."""
        if jax.process_index() == 0:
            aside = self.directory.parent / DAMAGED_DIR
            aside.mkdir(parents=True, exist_ok=True)
            target = aside / f"{step}-{int(time.time())}"
            (self.directory / str(step)).rename(target)
            _warn(f"moved the unreadable checkpoint step {step} to {target}")
        if jax.process_count() > 1:       # every process sees the same steps, so all get here
            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self.manager.reload()

    def saved_config(self, step: int) -> dict[str, Any]:
        """The TrainConfig (as a dict) stored with checkpoint ``step``."""
        return self._json_item(step, "config")

    def _json_item(self, step: int, item: str) -> Any:
        """A JSON item of checkpoint ``step``, read as a file by each process on its own: an
        Orbax restore synchronises the processes, so one whose read failed before reaching
        it would leave the others waiting in a different collective."""
        return json.loads((self.directory / str(step) / item / JSON_ITEM_FILE).read_text())

    def check_data(self, step: int, allow_data_change: bool = False) -> None:
        """``ValueError`` naming what changed when the data differs from checkpoint ``step``'s
        (checkpoints written before fingerprints existed are not checked)."""
        if not (self.directory / str(step) / FINGERPRINT_ITEM).exists():
            return
        saved = self._read(step, lambda: self._json_item(step, FINGERPRINT_ITEM))
        changes = data_changes(saved, self.fingerprint)
        if not changes:
            return
        what = "; ".join(changes)
        if heldout_moved(saved, self.fingerprint):
            raise ValueError(f"the data changed since checkpoint {step} and the held-out split "
                             f"moved ({what}): documents trained on would leak into eval; "
                             "restore the original data or use a new workdir")
        if not allow_data_change:
            raise ValueError(f"the training data changed since checkpoint {step} ({what}); "
                             "restore the original data, use a new workdir, or accept it "
                             "with --allow-data-change")
        print(f"warning: training on changed data ({what})", flush=True)

    def wait(self) -> None:
        self._saving(self.manager.wait_until_finished)

    def close(self) -> None:
        """Finish pending saves (after a failed one: only release the manager)."""
        try:
            if not self.failed:
                self.wait()
        finally:
            self.manager.close()


def check_compatible(saved: dict[str, Any], current: TrainConfig) -> None:
    """Raise ``ValueError`` naming every model field (of the resolved MythosConfig) and data
    field that differs between the checkpoint's config and ``current``."""
    problems = []
    sections = {
        "model": (TrainConfig.from_dict(saved).model_config().to_dict(),
                  current.model_config().to_dict()),
        "data": (saved.get("data", {}), current.to_dict()["data"]),
    }
    for section, (old, new) in sections.items():
        for name in sorted(set(old) | set(new)):
            if section == "data" and name in DATA_FIELDS_FREE_TO_CHANGE:
                continue
            if _normalise(old.get(name)) != _normalise(new.get(name)):
                problems.append(f"{section}.{name}: checkpoint {old.get(name)!r}, "
                                f"config {new.get(name)!r}")
    if problems:
        raise ValueError("the checkpoint was written by an incompatible config: "
                         + "; ".join(problems)
                         + " (use a new workdir, or restore the original settings)")


def read_failure(err: BaseException) -> str:
    """Why a checkpoint read failed: "content" (the stored bytes are invalid: unparsable
    JSON, a missing or short file), "transient" (storage or network: worth retrying),
    "access" (permission) or "other" (e.g. an Orbax version); the first exception of the
    chain that says decides."""
    while err is not None:
        if isinstance(err, (json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError)):
            return "content"
        if isinstance(err, PermissionError):
            return "access"
        if isinstance(err, (ConnectionError, TimeoutError, OSError)):
            return "transient"
        code = re.match(r"([A-Z_]+): ", str(err))
        if code and code[1] in CONTENT_CODES:
            return "content"
        if code and code[1] in TRANSIENT_CODES:
            return "transient"
        if code and code[1] in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            return "access"
        err = err.__cause__ or err.__context__
    return "other"


_SEVERITY = ("ok", "content", "transient", "access", "other")


def _agreed(kind: str) -> str:
    """The most severe read outcome over every process (``kind`` on one process)."""
    if jax.process_count() == 1:
        return kind
    codes = multihost_utils.process_allgather(np.int32(_SEVERITY.index(kind)))
    worst = int(np.max(codes))
    if not 0 <= worst < len(_SEVERITY):
        raise RuntimeError(f"the processes are out of step while reading a checkpoint (got "
                           f"outcome codes {np.asarray(codes).tolist()})")
    return _SEVERITY[worst]


def _warn(text: str) -> None:
    """A line to stderr from process 0 (stdout may be a command's product, e.g. generate)."""
    if jax.process_index() == 0:
        print(text, file=sys.stderr, flush=True)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
