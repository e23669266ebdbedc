"""A model from any form it is stored in: a model checkpoint, a training run, OpenMythos weights.

    model = load_model("ckpt/run1")                  # checkpoints.model.save_model's directory
    model = load_model("runs/small")                 # a training workdir: its newest readable step
    model, source = load_model_and_source("w.safetensors")   # source: "OpenMythos weights"
    training_source("runs/small")                    # ("/abs/runs/small", None): newest readable
    training_source("runs/small/checkpoints/2400")   # ("/abs/runs/small", 2400)
    model, step = load_trained_model("/abs/runs/small", step=None)

A training checkpoint is restored onto one device through the run's own plan (so its config
check and damaged-checkpoint handling apply); only the parameters and buffers are kept (the
optimizer state is read too, then dropped: the restore takes the whole saved state).
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import jax
from flax import nnx

from mythos_jax import paths
from mythos_jax.checkpoints.model import checkpoint_problem, is_checkpoint, load_model_dir
from mythos_jax.checkpoints.training import CHECKPOINT_DIR, Checkpointer
from mythos_jax.model import OpenMythos
from mythos_jax.parallel.mesh import make_mesh
from mythos_jax.train.config import TrainConfig
from mythos_jax.train.config_file import parse_json
from mythos_jax.train.step import build_plan
from mythos_jax.train.data import get_vocab
from mythos_jax.train.tokenizer import BYTES, TOKENIZER_FILE, Vocab, load_vocab
from mythos_jax.train.trainer import CONFIG_FILE


def load_model(path: str | os.PathLike, *, step: int | None = None) -> OpenMythos:
    """The model at ``path``, onto the default device: a checkpoint written by ``save_model``
    (``checkpoints.model``), a training workdir (its newest readable checkpoint, or ``step``),
    one training checkpoint ``WORKDIR/checkpoints/N``, or an OpenMythos ``.pt``/``.safetensors``.

    Raises ``ValueError`` naming the path when it is none of these.
    """
    return load_model_and_source(path, step=step)[0]


def load_model_and_source(path: str | os.PathLike, *,
                          step: int | None = None) -> tuple[OpenMythos, str]:
    """:func:`load_model` and a description of what was read (e.g. "training step 2400")."""
    path = paths.resolve(path)
    single = is_checkpoint(path) or path.is_file()
    if single and step is not None:
        raise ValueError(f"{path} holds one model: a step (got {step}) only selects a "
                         "checkpoint of a training workdir")
    if is_checkpoint(path):
        return load_model_dir(path), "model checkpoint"
    if path.is_file():
        from mythos_jax.interop.files import is_openmythos_file, load_openmythos_file
        if not is_openmythos_file(os.fspath(path)):
            raise ValueError(f"{path}: expected an OpenMythos .pt/.pth/.safetensors file, a "
                             "model checkpoint directory or a training workdir")
        return load_openmythos_file(os.fspath(path)), "OpenMythos weights"
    source = training_source(path, step)
    if source is None:
        raise ValueError(f"{path} is not a mythos-jax checkpoint: {checkpoint_problem(path)}; "
                         "nor a training workdir (no checkpoints/), a training checkpoint "
                         "(WORKDIR/checkpoints/N) or a .pt/.pth/.safetensors file")
    model, restored = load_trained_model(*source)
    return model, f"training step {restored} of {source[0]}"


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


def stored_tokenizer(path: str | os.PathLike):
    """The tokenizer.json stored with the model at ``path`` (a training workdir, one of its
    checkpoints, or a model checkpoint), or None: byte-level runs and OpenMythos files have
    none."""
    source = training_source(path)
    folder = paths.resolve(source[0] if source else path)
    copy = folder / TOKENIZER_FILE
    return copy if folder.is_dir() and copy.is_file() else None


def model_vocab(path: str | os.PathLike, vocab_size: int) -> Vocab:
    """The vocabulary the model stored at ``path`` reads: its tokenizer.json; else a training
    run's own (byte level, or its tokenizer where the file still is); else byte level for a
    model of 256-258 ids. ``ValueError`` naming the path otherwise (never a guess)."""
    stored = stored_tokenizer(path)
    if stored is not None:
        return load_vocab(local_file(stored))
    source = training_source(path)
    if source is not None:
        try:
            vocab = get_vocab(read_train_config(source[0]).data)
        except (OSError, ValueError):
            vocab = None                   # its corpus or tokenizer is not here
        if vocab is not None and (vocab.name == "bytes" or os.path.isfile(vocab.name)):
            return vocab
    elif 256 <= vocab_size <= BYTES.size:
        return BYTES
    raise ValueError(f"{path}: no {TOKENIZER_FILE} is stored with this model (a vocabulary of "
                     f"{vocab_size} ids, not byte level): give its tokenizer with --tokenizer")


def prompt_vocab(path: str | os.PathLike | None, vocab_size: int,
                 tokenizer: str | None = None) -> Vocab:
    """The vocabulary a model of ``vocab_size`` ids reads its prompts in: ``tokenizer``
    ("bytes" or a tokenizer.json) when given, else the one stored with the model at ``path``
    (:func:`model_vocab`), else (no path: a randomly initialised variant) byte level.
    ``ValueError`` naming the problem when it cannot serve the model."""
    if tokenizer is not None:
        try:
            vocab = load_vocab(tokenizer)
        except (OSError, ValueError, ImportError) as err:
            raise ValueError(f"tokenizer {tokenizer}: {err}") from None
    else:
        vocab = BYTES if path is None else model_vocab(path, vocab_size)
    if vocab.name == "bytes" and vocab_size < 256:
        raise ValueError(f"byte-level prompts need vocab_size >= 256, this model has "
                         f"{vocab_size}")
    if vocab.name != "bytes" and vocab.size > vocab_size:
        raise ValueError(f"the tokenizer {vocab.name} has {vocab.size} ids, more than the "
                         f"model's vocab_size {vocab_size}")
    return vocab


def local_file(path) -> str:
    """``path`` as a local file: a bucket object is copied to the temporary folder once (by
    content), as the tokenizers package reads local files only."""
    if not paths.is_remote(path):
        return os.fspath(path)
    data = paths.resolve(path).read_bytes()
    local = os.path.join(tempfile.gettempdir(),
                         f"mythos-jax-{hashlib.sha256(data).hexdigest()[:16]}-{path.name}")
    if not os.path.exists(local):
        paths.write_bytes(local, data)
    return local


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
