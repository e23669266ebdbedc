"""The model a command reads from a path (``parity --checkpoint``, ``generate --checkpoint``)."""

from __future__ import annotations

import os
import sys

from mythos_jax.errors import CommandError


def checkpoint_model(path: str, step: int | None):
    """The model at ``path`` (any form ``checkpoints.load.load_model`` reads); what it is goes to
    stderr."""
    from mythos_jax.checkpoints.load import load_model_and_source

    if not os.path.exists(path):
        raise CommandError(f"{path}: no such file or directory")
    model, source = load_model_and_source(path, step=step)
    print(f"model: {source}", file=sys.stderr, flush=True)
    return model
