"""The model of a training run: a workdir or one of its checkpoints -> OpenMythos.

    training_source("runs/small")                    # ("/abs/runs/small", None): newest readable
    training_source("runs/small/checkpoints/2400")   # ("/abs/runs/small", 2400)
    model, step = load_trained_model("/abs/runs/small", step=None)

The checkpoint is restored onto one device through the run's own plan (so its config check
and damaged-checkpoint handling apply); only the parameters and buffers are kept (the
optimizer state is read too, then dropped: the restore takes the whole saved state).
"""

from __future__ import annotations

import os

import jax
from flax import nnx

from mythos_jax import paths
from mythos_jax.model import OpenMythos
from mythos_jax.parallel.mesh import make_mesh
from mythos_jax.train.checkpointing import CHECKPOINT_DIR, Checkpointer
from mythos_jax.train.config import TrainConfig
from mythos_jax.train.config_file import parse_json
from mythos_jax.train.step import build_plan
from mythos_jax.train.trainer import CONFIG_FILE


def training_source(path: str | os.PathLike,
                    step: int | None = None) -> tuple[str, int | None] | None:
    """``(workdir, step)`` when ``path`` is a training workdir (``step`` as asked; None:
    the newest readable) or one of its ``checkpoints/<step>`` directories (``ValueError`` if
    another ``step`` is asked for); None otherwise."""
    path = paths.resolve(path)
    if (path / CHECKPOINT_DIR).is_dir():
        return os.fspath(path), step
    name = path.name
    if path.parent.name != CHECKPOINT_DIR or not name.isdigit() or not path.is_dir():
        return None
    if step is not None and step != int(name):
        raise ValueError(f"{path} is the checkpoint of step {name}, not {step}")
    return os.fspath(path.parent.parent), int(name)


def read_train_config(workdir: str) -> TrainConfig:
    """The ``TrainConfig`` a run in ``workdir`` was started with."""
    path = paths.join(workdir, CONFIG_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
    return TrainConfig.from_dict(parse_json(path.read_text(), os.fspath(path)))


def load_trained_model(workdir: str, step: int | None = None) -> tuple[OpenMythos, int]:
    """(the model at ``step``, default the newest readable checkpoint; that step)."""
    cfg = read_train_config(workdir)
    plan = build_plan(cfg, make_mesh("data=1", jax.devices()[:1]))
    checkpointer = Checkpointer(workdir, plan)
    try:
        state = checkpointer.restore(step=step)
    finally:
        checkpointer.close()
    abstract = nnx.eval_shape(lambda: OpenMythos(cfg.model_config(), rngs=nnx.Rngs(0)))
    graphdef, params, buffers = nnx.split(abstract, nnx.Param, ...)
    nnx.replace_by_pure_dict(params, state.params)
    nnx.replace_by_pure_dict(buffers, state.buffers)
    return nnx.merge(graphdef, params, buffers), int(state.step)
