"""Paths that may be bucket URLs: one layer for every file a run writes or reads.

    workdir = resolve("gs://bucket/run")    # epath.Path("gs://bucket/run"): stays a URL
    workdir = resolve("runs/tiny")          # epath.Path("/abs/cwd/runs/tiny")

Local paths are made absolute; ``gs://`` URLs are kept as they are (Orbax writes arrays there
through TensorStore's GCS driver, everything else goes through ``etils.epath``). Any other
``scheme://`` is refused naming it, so a URL never turns into a local folder named ``gs:``.
Writes are atomic: locally a temporary sibling renamed into place; in a bucket an object upload
(all or nothing). Logs that grow are :mod:`mythos_jax.train.log_files`' (object stores cannot
append).
"""

from __future__ import annotations

import os
import secrets

from etils import epath

REMOTE_SCHEMES = ("gs",)     # the URL schemes both epath and Orbax's TensorStore layer write


def resolve(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: a ``gs://`` URL unchanged, ``file://`` and local paths
    absolute; ``ValueError`` naming the path for any other scheme."""
    text = os.fspath(path)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return epath.Path(os.path.abspath(text))
    if scheme == "file":
        return epath.Path(os.path.abspath(rest))
    if scheme not in REMOTE_SCHEMES or not rest.strip("/"):
        raise ValueError(f"{text!r}: unsupported path; use a local path or "
                         f"{' or '.join(s + '://BUCKET/PATH' for s in REMOTE_SCHEMES)}")
    return epath.Path(text)


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a bucket URL (not a local file)."""
    return os.fspath(path).partition("://")[0] in REMOTE_SCHEMES


def join(path: str | os.PathLike, *names: str) -> epath.Path:
    """``resolve(path) / name / ...``."""
    return resolve(path).joinpath(*names)


def read_text(path: str | os.PathLike) -> str:
    return resolve(path).read_text()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (readers see the old or the new file) and, on a
    local disk, durably: the bytes are synced before the rename, the folder after it."""
    target = resolve(path)
    if is_remote(target):
        target.write_bytes(data)
        return
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _sync_folder(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _sync_folder(folder) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_png(fig, path: str | os.PathLike) -> str:
    """A matplotlib figure laid out and written as a PNG to ``path`` (local or gs://), then
    closed; returns the path written."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    write_bytes(path, png.getvalue())
    return str(resolve(path))
