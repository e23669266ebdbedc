"""Orbax checkpoints of a training run: ``<workdir>/checkpoints/<step>/``.

Each checkpoint holds the ``TrainState`` (parameters, buffers, optimizer state, step), the data
iterator's position (``get_state()`` as JSON: it counts global batches, so it is the same on
every process and valid for any process count) and the ``TrainConfig`` as JSON. Saves are asynchronous and atomic (Orbax writes a temporary
directory and renames it when complete; an interrupted save is never picked up). Restoring
takes the target shardings from the current plan, so a checkpoint written on one mesh or
device count is resharded onto another. The model and data sections must match the saved
ones, and so must the data itself (``fingerprint.py``: files, token and window counts, the
split); a mismatch raises ``ValueError`` naming what differs. ``allow_data_change`` accepts a
changed training corpus, never a moved held-out split.
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp

from mythos_jax import paths
from mythos_jax.train.config import TrainConfig
from mythos_jax.train.fingerprint import data_changes, data_fingerprint, heldout_moved
from mythos_jax.train.step import TrainPlan, TrainState

CHECKPOINT_DIR = "checkpoints"
FINGERPRINT_ITEM = "fingerprint"
# Data fields that may change between a run and its resumption without moving the stream.
DATA_FIELDS_FREE_TO_CHANGE = ("prefetch",)


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

    @property
    def fingerprint(self) -> dict[str, Any]:
        """The data fingerprint of the plan's config (computed once)."""
        if self._fingerprint is None:
            self._fingerprint = data_fingerprint(self.plan.cfg.data)
        return self._fingerprint

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_iterator, *, force: bool = False) -> None:
        """Start an asynchronous save of ``state`` and the iterator position at ``step``."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state._asdict()),
            data=ocp.args.JsonSave(data_iterator.get_state()),
            config=ocp.args.JsonSave(self.plan.cfg.to_dict()),
            **{FINGERPRINT_ITEM: ocp.args.JsonSave(self.fingerprint)}), force=force)

    def restore(self, data_iterator=None, step: int | None = None, *,
                allow_data_change: bool = False) -> TrainState:
        """The state at ``step`` (default: latest) in the plan's shardings; ``data_iterator``
        (if given) is moved to the saved position."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        check_compatible(self.saved_config(step), self.plan.cfg)
        self.check_data(step, allow_data_change)
        target = jax.tree.map(
            lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype,
                                                         sharding=sharding),
            self.plan.abstract_state._asdict(), self.plan.shardings._asdict())
        items = {"state": ocp.args.StandardRestore(target)}
        if data_iterator is not None:
            items["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if data_iterator is not None:
            data_iterator.set_state(restored["data"])
        return TrainState(**restored["state"])

    def saved_config(self, step: int) -> dict[str, Any]:
        """The TrainConfig (as a dict) stored with checkpoint ``step``."""
        return self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore()))["config"]

    def check_data(self, step: int, allow_data_change: bool = False) -> None:
        """``ValueError`` naming what changed when the data differs from checkpoint ``step``'s
        (checkpoints written before fingerprints existed are not checked)."""
        if not (self.directory / str(step) / FINGERPRINT_ITEM).exists():
            return
        saved = self.manager.restore(step, args=ocp.args.Composite(
            **{FINGERPRINT_ITEM: ocp.args.JsonRestore()}))[FINGERPRINT_ITEM]
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
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
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


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
