"""The ``mythos-jax`` command line.

    mythos-jax train --config cpu_small --workdir runs/small   # train / resume, depth curve
    mythos-jax eval --workdir runs/small --loops 1,2,4,8        # depth curve of a checkpoint
    mythos-jax plan --variant mythos_1b --topology v4-8 --mesh fsdp=4   # fits in TPU HBM?

    mythos-jax parity                                # convert OpenMythos models, parity + speed

    mythos-jax export runs/small ckpt/run1           # training run -> standalone model checkpoint
    mythos-jax convert runs/small model.safetensors  # training run -> OpenMythos weights
    mythos-jax convert step_0001000.pt ckpt/run1     # OpenMythos .pt -> mythos-jax checkpoint
    mythos-jax convert ckpt/run1 exported.pt         # mythos-jax checkpoint -> OpenMythos .pt

    mythos-jax generate --checkpoint runs/small --prompt "Once upon" --temperature 0.8
    mythos-jax generate --variant tiny_mla --prompt a --prompt b --max-new-tokens 16
    mythos-jax chat --checkpoint runs/small --temperature 0.7    # turns from stdin, cache kept

Each command is a module of ``mythos_jax.commands`` with ``add_arguments(parser)`` and
``run(args) -> int`` (its docstring is the command's description); register new ones in
``COMMANDS``. Heavy imports (torch, orbax, the model) happen inside ``run`` so that
``mythos-jax --help`` stays fast. A command reports an expected failure by raising
``CommandError`` (or ``FileNotFoundError``, ``FileExistsError``, ``ValueError``, an ``OSError``
naming a file): ``main`` prints ``error: ...`` on one line to stderr and returns 2. Without a
TPU on the host, JAX is kept off libtpu (``platforms``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from mythos_jax.errors import CommandError

EXIT_USAGE = 2

# (command, module under mythos_jax.commands, one-line help)
COMMANDS = (
    ("train", "train", "train (or resume) a looped model"),
    ("eval", "eval", "evaluate a training checkpoint at several loop counts"),
    ("prepare-data", "prepare_data", "tokenise text/JSONL files into ArrayRecord shards"),
    ("plan", "plan", "compile a training step for a TPU slice on this host: does it fit?"),
    ("experiment", "experiment",
     "run an experiment (depth extrapolation, test-time depth, stability)"),
    ("convert", "convert",
     "convert a model: training run / model checkpoint / .pt / .safetensors"),
    ("export", "convert",
     "write a training run's model as a standalone checkpoint or OpenMythos file"),
    ("parity", "parity",
     "convert small OpenMythos models and print the parity and speed tables"),
    ("generate", "generate", "sample text from a checkpoint or a randomly initialised variant"),
    ("chat", "chat", "talk to a model, turn by turn, keeping its KV cache between turns"),
    ("lm-eval", "lm_eval", "benchmark a model with lm-evaluation-harness at several depths"),
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; every subcommand sets ``func`` (its module's ``run``)."""
    from mythos_jax import __version__

    parser = argparse.ArgumentParser(
        prog="mythos-jax",
        description="mythos-jax: the OpenMythos Recurrent-Depth Transformer in JAX / Flax NNX.")
    parser.add_argument("--version", action="version", version=f"mythos-jax {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module, help in COMMANDS:
        command = importlib.import_module(f"mythos_jax.commands.{module}")
        sub = subparsers.add_parser(name, help=help, description=command.__doc__)
        command.add_arguments(sub)
        sub.set_defaults(func=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mythos-jax`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command != "plan":       # plan picks its own platforms
        from mythos_jax.platforms import skip_absent_tpu
        skip_absent_tpu()
    try:
        return args.func(args)
    except (CommandError, FileNotFoundError, FileExistsError, ValueError, ImportError) as err:
        return _report(err)
    except OSError as err:           # a path that cannot be read or written, a full disk
        if err.filename is None:
            raise
        return _report(f"{err.filename}: {err.strerror}")


def _report(err) -> int:
    print(f"error: {_one_line(err)}", file=sys.stderr)
    return EXIT_USAGE


def _one_line(err: BaseException | str) -> str:
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
