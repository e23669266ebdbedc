"""The ``mythos-jax`` command line.

    mythos-jax parity                                # convert OpenMythos models, parity + speed

    mythos-jax convert step_0001000.pt ckpt/run1     # OpenMythos .pt -> mythos-jax checkpoint
    mythos-jax convert ckpt/run1 exported.pt         # mythos-jax checkpoint -> OpenMythos .pt

Each subcommand is a ``cmd_NAME(args) -> int`` plus an ``_add_NAME(subparsers)`` that declares
its arguments; register new ones in ``build_parser``. Heavy imports (torch, orbax, the model)
happen inside the commands so that ``mythos-jax --help`` stays fast. A command reports an
expected failure by raising ``CommandError`` (or ``FileNotFoundError``, ``FileExistsError``,
``ValueError``): ``main`` prints ``error: ...`` on one line to stderr and returns 2.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from typing import Callable, Sequence

TORCH_SUFFIXES = (".pt", ".pth")
EXIT_USAGE = 2


class CommandError(Exception):
    """An expected, user-facing failure: printed as ``error: <message>``, exit code 2."""


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; every subcommand sets ``func`` (its ``cmd_*``) as a default."""
    from mythos_jax import __version__

    parser = argparse.ArgumentParser(
        prog="mythos-jax",
        description="mythos-jax: the OpenMythos Recurrent-Depth Transformer in JAX / Flax NNX.")
    parser.add_argument("--version", action="version", version=f"mythos-jax {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mythos-jax`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CommandError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE


# ---------------------------------------------------------------------------- convert
def _add_convert(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert between OpenMythos .pt checkpoints and mythos-jax checkpoints",
        description="Convert in the direction given by SRC: an OpenMythos training checkpoint "
                    "(.pt/.pth, {'model': state_dict, 'cfg': MythosConfig, ...}) becomes a "
                    "mythos-jax checkpoint directory; a mythos-jax checkpoint directory becomes "
                    "an OpenMythos .pt/.pth file (step 0, no optimizer state).")
    p.add_argument("src", metavar="SRC", help="OpenMythos .pt/.pth file or mythos-jax checkpoint")
    p.add_argument("dst", metavar="DST", help="output: checkpoint directory or .pt/.pth file")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    """OpenMythos ``.pt`` <-> mythos-jax checkpoint directory, direction taken from SRC."""
    from mythos_jax import checkpoint

    src, dst = args.src, args.dst
    if not os.path.exists(src):
        raise CommandError(f"{src}: no such file or directory")
    if os.path.isfile(src) and src.endswith(TORCH_SUFFIXES):
        if dst.endswith(TORCH_SUFFIXES):
            raise CommandError(f"{dst}: converting a .pt checkpoint writes a mythos-jax "
                               "checkpoint directory; give DST without a .pt/.pth suffix")
        if os.path.lexists(dst) and not args.overwrite:
            raise CommandError(f"{dst} already exists (use --overwrite to replace it)")
        model = _load_torch_checkpoint(src)
        checkpoint.save_model(model, dst, overwrite=args.overwrite)
        kind = "mythos-jax checkpoint"
    elif os.path.isdir(src):
        if not dst.endswith(TORCH_SUFFIXES):
            raise CommandError(f"{dst}: converting a mythos-jax checkpoint writes an OpenMythos "
                               "file; give DST a .pt or .pth suffix")
        if os.path.lexists(dst) and not args.overwrite:
            raise CommandError(f"{dst} already exists (use --overwrite to replace it)")
        if os.path.isdir(dst):
            raise CommandError(f"{dst} is a directory; refusing to replace it with a file")
        model = checkpoint.load_model(src)
        _save_torch_checkpoint(model, dst)
        kind = "OpenMythos checkpoint"
    else:
        raise CommandError(f"{src}: expected an OpenMythos .pt/.pth file or a mythos-jax "
                           "checkpoint directory")
    cfg = model.cfg
    print(f"wrote {kind} {dst} ({checkpoint.parameter_count(model):,} parameters, "
          f"attn_type={cfg.attn_type}, dim={cfg.dim}) from {src}")
    return 0


def _load_torch_checkpoint(src: str):
    from mythos_jax.interop.openmythos import load_openmythos_checkpoint

    try:
        return load_openmythos_checkpoint(src)
    except ValueError as err:
        if src in str(err):
            raise
        raise CommandError(f"{src}: {err}") from err
    except ImportError as err:
        raise CommandError(f"reading {src} needs torch and open-mythos: {err}") from err
    except Exception as err:  # torch.load: pickle, zip and EOF errors of a foreign/broken file
        raise CommandError(f"{src}: cannot read as an OpenMythos checkpoint "
                           f"({type(err).__name__}: {err})") from err


def _save_torch_checkpoint(model, dst: str) -> None:
    """``save_openmythos_checkpoint`` through a temporary sibling, renamed into place."""
    from mythos_jax.interop.openmythos import save_openmythos_checkpoint

    parent, name = os.path.split(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        save_openmythos_checkpoint(model, tmp)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ---------------------------------------------------------------------------- helpers
# ---------------------------------------------------------------------------- parity
def _add_parity(subparsers) -> None:
    p = subparsers.add_parser(
        "parity", help="convert small OpenMythos models and print the parity and speed tables",
        description="Build small OpenMythos models in PyTorch (open-mythos 0.5.0) with weights "
                    "moved away from init, convert them, compare logits over attention types, "
                    "loop counts and sequence lengths, then benchmark both implementations.")
    p.add_argument("--preset", default="default", help="benchmark config (default, small, tiny)")
    p.add_argument("--quick", action="store_true", help="fewer benchmark iterations")
    p.add_argument("--no-bench", action="store_true", help="parity table only")
    p.add_argument("--json", metavar="PATH", help="write all figures as JSON")
    p.set_defaults(func=cmd_parity)


def cmd_parity(args: argparse.Namespace) -> int:
    """Parity table (exit 1 if any row is off), then the speed table."""
    import json

    from mythos_jax.interop.parity import format_parity, parity_report

    rows = parity_report()
    print(format_parity(rows), flush=True)
    result = {"parity": rows}
    if not args.no_bench:
        from mythos_jax.benchmark import format_table, run_benchmark

        print(flush=True)
        result["benchmark"] = run_benchmark(preset=args.preset, quick=args.quick)
        print(format_table(result["benchmark"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if all(r["ok"] for r in rows) else 1


def _one_line(err: BaseException) -> str:
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_convert, _add_parity]


if __name__ == "__main__":
    sys.exit(main())
