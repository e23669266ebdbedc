"""A whole OpenMythos (JAX) model as a mythos-jax checkpoint directory.

    save_model(model, "ckpt/run1")            # ckpt/run1/config.json + ckpt/run1/state/ (Orbax)
    model = load_model_dir("ckpt/run1")       # a fresh OpenMythos with the same weights

(``mythos_jax.checkpoints.load.load_model`` reads this and every other form of a model.)

``state/`` holds all of ``nnx.state(model)``: the parameters, the ``RouterBias`` buffers and,
when ``cfg.dropout > 0``, the dropout RNG stream (key and count), so a reloaded model draws the
same dropout masks. ``config.json`` is ``MythosConfig.to_json()``. The train/eval flag
(``model.deterministic``) is not state: a loaded model starts in train mode, like a new one.

Writes are atomic: the directory is built under a temporary sibling and renamed into place,
so an interrupted save never leaves a partial checkpoint at ``path``. Paths may be ``gs://``
URLs (``mythos_jax.paths``). A bucket "rename" is a copy, object by object, so there the save
ends by writing ``COMMITTED`` into the directory, readers require it, and an overwrite
deletes it before touching anything else. Single-process only.
"""

from __future__ import annotations

import os
import secrets

import jax
import orbax.checkpoint as ocp
from flax import nnx

from mythos_jax import paths
from mythos_jax.budget import check_fits, tree_bytes
from mythos_jax.config import MythosConfig
from mythos_jax.model import OpenMythos
from mythos_jax.train.tokenizer import copy_tokenizer

CONFIG_FILE = "config.json"
STATE_DIR = "state"
COMMIT_FILE = "COMMITTED"      # the last object of a save into a bucket


def save_model(model: OpenMythos, path: str | os.PathLike, *, overwrite: bool = False,
               tokenizer: str | os.PathLike | None = None) -> None:
    """Write ``model`` (config and full state) to the directory ``path``, with a copy of the
    ``tokenizer`` json file (path or URL) it reads, if given.

    An existing ``path`` raises ``FileExistsError`` unless ``overwrite=True``; even then only an
    existing mythos-jax checkpoint or an empty directory is replaced (anything else raises
    ``FileExistsError`` rather than being deleted). The new checkpoint is complete before the
    old one is moved aside, and the swap is two renames.
    """
    if not isinstance(model, OpenMythos):
        raise TypeError(f"model must be a mythos_jax.OpenMythos, got {type(model).__name__}")
    path = paths.resolve(path)
    if _lexists(path):
        _check_replaceable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)

    tmp = _sibling(path, "tmp")
    tmp.mkdir()                                    # honours the umask, unlike mkdtemp (0700)
    try:
        (tmp / CONFIG_FILE).write_text(model.cfg.to_json() + "\n")
        copy_tokenizer(tokenizer, tmp)
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / STATE_DIR, nnx.state(model))
            checkpointer.wait_until_finished()
        _move_into_place(tmp, path, overwrite)
    except BaseException:
        tmp.rmtree(missing_ok=True)
        raise
    if paths.is_remote(path):
        paths.write_text(path / COMMIT_FILE, "")


def load_model_dir(path: str | os.PathLike) -> OpenMythos:
    """Read a checkpoint written by :func:`save_model`."""
    path = paths.resolve(path)
    cfg = load_config(path)
    abstract = nnx.eval_shape(lambda: OpenMythos(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    check_fits(f"the parameters of {path}", tree_bytes(abstract_state),
               f"its {CONFIG_FILE} asks for dim={cfg.dim}, vocab_size={cfg.vocab_size}, "
               f"n_experts={cfg.n_experts}, expert_dim={cfg.expert_dim}")
    # Explicit shardings: a no-sharding restore fails when the saving topology differs.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          abstract_state)
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(path / STATE_DIR, target)
    return nnx.merge(graphdef, state)


def load_config(path: str | os.PathLike) -> MythosConfig:
    """The ``MythosConfig`` of the checkpoint at ``path`` (no weights read)."""
    path = paths.resolve(path)
    missing = checkpoint_problem(path)
    if missing:
        raise ValueError(f"{path} is not a mythos-jax checkpoint: {missing}")
    text = (path / CONFIG_FILE).read_text()
    try:
        return MythosConfig.from_json(text)
    except ValueError as err:
        raise ValueError(f"{path}/{CONFIG_FILE}: invalid config: {err}") from err


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like a mythos-jax checkpoint directory (cheap; reads nothing)."""
    return checkpoint_problem(paths.resolve(path)) is None


def checkpoint_problem(path, *, committed: bool = True) -> str | None:
    """None for a checkpoint directory, else what is missing, e.g. "missing config.json"
    (``committed=False``: a bucket directory without its commit marker passes)."""
    if not path.exists():
        return "no such file or directory"
    if not path.is_dir():
        return "not a directory"
    missing = []
    if not (path / CONFIG_FILE).is_file():
        missing.append(CONFIG_FILE)
    if not (path / STATE_DIR).is_dir():
        missing.append(f"{STATE_DIR}/")
    if committed and paths.is_remote(path) and not (path / COMMIT_FILE).is_file():
        missing.append(f"{COMMIT_FILE} (its save did not finish)")
    return f"missing {' and '.join(missing)}" if missing else None


def parameter_count(model: OpenMythos) -> int:
    """Number of trainable scalars (``nnx.Param`` leaves only; buffers and RNG state excluded)."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ---------------------------------------------------------------------------- helpers
def _sibling(path, tag: str):
    """An unused hidden name next to ``path``: ``.NAME.TAG-PID-RANDOM``."""
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def _is_link(path) -> bool:
    return not paths.is_remote(path) and os.path.islink(path)


def _lexists(path) -> bool:
    """Whether ``path`` exists (a dangling local symlink counts)."""
    return path.exists() or _is_link(path)


def _check_replaceable(path, overwrite: bool) -> None:
    if not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    if path.is_dir() and not _is_link(path) and (
            checkpoint_problem(path, committed=False) is None or not any(path.iterdir())):
        return
    raise FileExistsError(f"{path} exists and is not a mythos-jax checkpoint or an empty "
                          "directory; refusing to replace it")


def _move_into_place(tmp, path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``path``, moving an existing ``path`` aside first."""
    if not _lexists(path):
        tmp.replace(path)
        return
    _check_replaceable(path, overwrite)  # it may have appeared while we were writing
    if paths.is_remote(path):
        (path / COMMIT_FILE).unlink(missing_ok=True)   # a copy stopped half-way is no checkpoint
    old = _sibling(path, "old")
    path.replace(old)
    try:
        tmp.replace(path)
    except BaseException:
        old.replace(path)
        raise
    old.rmtree(missing_ok=True)
