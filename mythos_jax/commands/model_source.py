"""The model a command reads from a path or a ``gs://`` URL (``parity --checkpoint``,
``generate --checkpoint``)."""

from __future__ import annotations

import sys

from mythos_jax import paths
from mythos_jax.errors import CommandError


def checkpoint_model(path: str, step: int | None):
    """The model at ``path`` (any form ``checkpoints.load.load_model`` reads); what it is goes to
    stderr."""
    from mythos_jax.checkpoints.load import load_model_and_source

    try:
        found = paths.resolve(path).exists()
    except ValueError as err:                  # an unsupported URL scheme
        raise CommandError(str(err)) from None
    if not found:
        raise CommandError(f"{path}: no such file or directory")
    model, source = load_model_and_source(path, step=step)
    print(f"model: {source}", file=sys.stderr, flush=True)
    return model
