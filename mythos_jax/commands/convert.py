"""Convert a model between its forms; the direction is given by SRC and DST.

SRC: a training workdir (its newest readable checkpoint, or --step N), one training
checkpoint (WORKDIR/checkpoints/N), a mythos-jax model checkpoint directory, or OpenMythos
weights (.pt/.pth, read without running code from the pickle; .safetensors). DST: a .pt/.pth
or .safetensors file (OpenMythos weights that open_mythos.main.OpenMythos(cfg)
.load_state_dict(..., strict=True) accepts; the config rides along: 'cfg' in a .pt,
metadata 'mythos_config' in a .safetensors), or else a directory that becomes a standalone
mythos-jax model checkpoint (parameters and config, no optimizer state; the run's
tokenizer.json with it when it has one).
"""

from __future__ import annotations

import argparse
import os
import secrets

from mythos_jax.errors import CommandError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="training workdir or checkpoint, model "
                                              "checkpoint, .pt/.pth or .safetensors file")
    p.add_argument("dst", metavar="DST", help="output: model checkpoint directory, or a "
                                              ".pt/.pth/.safetensors file")
    p.add_argument("--step", type=int, metavar="N",
                   help="checkpoint step of a training workdir (default: newest readable)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def run(args: argparse.Namespace) -> int:
    """Read SRC (any form), write DST (form from its suffix)."""
    from mythos_jax import paths
    from mythos_jax.checkpoints.load import load_model_and_source, stored_tokenizer
    from mythos_jax.checkpoints.model import parameter_count, save_model
    from mythos_jax.interop.files import is_openmythos_file

    src, dst = args.src, args.dst
    for path in (src, dst):
        if is_openmythos_file(path) and paths.is_remote(path):
            raise CommandError(f"{path}: .pt/.safetensors files are read and written locally; "
                               "copy them to or from the bucket")
    if not paths.resolve(src).exists():
        raise CommandError(f"{src}: no such file or directory")
    if paths.resolve(dst).exists() and not args.overwrite:
        raise CommandError(f"{dst} already exists (use --overwrite to replace it)")
    to_file = is_openmythos_file(dst)
    if to_file and os.path.isdir(dst):
        raise CommandError(f"{dst} is a directory; refusing to replace it with a file")
    model, source = load_model_and_source(src, step=args.step)
    if to_file:
        _write_file(model, dst)
        kind = "OpenMythos checkpoint"
    else:
        save_model(model, dst, overwrite=args.overwrite, tokenizer=stored_tokenizer(src))
        kind = "mythos-jax checkpoint"
    cfg = model.cfg
    print(f"wrote {kind} {dst} ({parameter_count(model):,} parameters, "
          f"attn_type={cfg.attn_type}, dim={cfg.dim}) from {src} ({source})")
    return 0


def _write_file(model, dst: str) -> None:
    """``save_openmythos_file`` through a temporary sibling (same suffix), renamed into place."""
    from mythos_jax.interop.files import require_openmythos_numerics, save_openmythos_file

    require_openmythos_numerics(model.cfg)        # refused before a temporary file exists
    parent, name = os.path.split(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    suffix = os.path.splitext(name)[1]
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{suffix}")
    try:
        save_openmythos_file(model, tmp)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
