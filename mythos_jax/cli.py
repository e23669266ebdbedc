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

Each subcommand is a ``cmd_NAME(args) -> int`` plus an ``_add_NAME(subparsers)`` that declares
its arguments; register new ones in ``build_parser``. Heavy imports (torch, orbax, the model)
happen inside the commands so that ``mythos-jax --help`` stays fast. A command reports an
expected failure by raising ``CommandError`` (or ``FileNotFoundError``, ``FileExistsError``,
``ValueError``, an ``OSError`` naming a file): ``main`` prints ``error: ...`` on one line to
stderr and returns 2. Without a TPU on the host, JAX is kept off libtpu (``platforms``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from mythos_jax.errors import CommandError

DEFAULT_NEW_TOKENS = 64
EXIT_USAGE = 2


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
    p.add_argument("--checkpoint", metavar="PATH",
                   help="instead: this model (a training workdir, WORKDIR/checkpoints/N, a "
                        "model checkpoint) against its PyTorch conversion; no benchmark")
    p.add_argument("--step", type=int, metavar="N", help="checkpoint step of a training workdir")
    p.set_defaults(func=cmd_parity)


def cmd_parity(args: argparse.Namespace) -> int:
    """Parity table (exit 1 if any row is off), then the speed table."""
    from mythos_jax.bench.timing import write_json
    from mythos_jax.bench.torch_compare import format_table, run_benchmark
    from mythos_jax.interop.parity import format_parity, model_parity, parity_report

    if args.checkpoint is None:
        rows = parity_report()
    else:
        rows = model_parity(_checkpoint_model(args.checkpoint, args.step))
    print(format_parity(rows), flush=True)
    result = {"parity": rows}
    if not args.no_bench and args.checkpoint is None:
        print(flush=True)
        result["benchmark"] = run_benchmark(preset=args.preset, quick=args.quick)
        print(format_table(result["benchmark"]))
    write_json(result, args.json)
    return 0 if all(r["ok"] for r in rows) else 1


# ---------------------------------------------------------------------------- generate
def _add_generate(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="sample text from a checkpoint or a randomly initialised variant",
        description="Generate text with byte-level tokens: each prompt is its UTF-8 bytes "
                    "(token id = byte value, so the model needs vocab_size >= 256) and "
                    "generated ids < 256 are decoded back as bytes (invalid UTF-8 becomes "
                    "U+FFFD, control characters are escaped, ids >= 256 print as <id>). One "
                    "prompt: the text is streamed to stdout as it is generated. Several "
                    "prompts: the first is streamed to stderr, then stdout gets one line per "
                    "prompt (prompt + continuation, newlines escaped).")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="PATH",
                        help="a training workdir (its newest readable checkpoint, or --step), "
                             "a training checkpoint WORKDIR/checkpoints/N, a model checkpoint "
                             "or OpenMythos weights (.pt/.pth/.safetensors)")
    source.add_argument("--variant", metavar="NAME",
                        help="a named config (mythos_jax.variants, e.g. tiny_mla) with "
                             "random weights drawn from --seed")
    p.add_argument("--step", type=int, metavar="N", help="checkpoint step of a training workdir")
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                   help="prompt text; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="tokens to generate per prompt (default 64, fewer if the model's "
                        "max_seq_len leaves less room after the prompt)")
    p.add_argument("--n-loops", type=int, metavar="N",
                   help="recurrent loop depth (default: the config's max_loop_iters)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature; 0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, metavar="K", help="sample from the K likeliest tokens")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling, P in (0, 1]")
    p.add_argument("--eos-id", type=int, metavar="ID",
                   help="stop a sequence after this token (not printed)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random weights (--variant) and of the sampling")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    """Byte-level generation; streams the first sequence, see ``_add_generate``."""
    import time

    from mythos_jax.inference.generate import check_generation_args, generate

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise CommandError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.n_loops is not None and args.n_loops < 1:
        raise CommandError(f"--n-loops must be >= 1, got {args.n_loops}")
    prompts = [list(text.encode("utf-8")) for text in args.prompt]
    if any(not p for p in prompts):
        raise CommandError("--prompt must not be empty")

    model = _generation_model(args)
    cfg = model.cfg
    if cfg.vocab_size < 256:
        raise CommandError(f"byte-level prompts need vocab_size >= 256, this model has "
                           f"{cfg.vocab_size}")
    longest = max(len(p) for p in prompts)
    if longest >= cfg.max_seq_len:
        raise CommandError(f"prompt of {longest} bytes leaves no room for new tokens: the "
                           f"model's max_seq_len is {cfg.max_seq_len}")
    max_new_tokens = (min(DEFAULT_NEW_TOKENS, cfg.max_seq_len - longest)
                      if args.max_new_tokens is None else args.max_new_tokens)
    # Every argument error before the first byte of output.
    check_generation_args(cfg, longest, max_new_tokens, args.temperature, args.top_k,
                          args.top_p, args.eos_id)

    single = len(prompts) == 1
    stream = sys.stdout if single else sys.stderr
    printer = _ByteStream(stream, args.eos_id)
    if single:
        printer.write_text(args.prompt[0])
    else:
        stream.write("[0] " + _escape(args.prompt[0]))
    stream.flush()

    start = time.perf_counter()
    result = generate(model, prompts, max_new_tokens, n_loops=args.n_loops,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                      eos_id=args.eos_id, seed=args.seed,
                      on_token=lambda tokens: printer.push(int(tokens[0])))
    seconds = time.perf_counter() - start
    printer.close()
    stream.write("\n")
    stream.flush()
    if not single:
        for text, row, length in zip(args.prompt, result.tokens, result.lengths):
            row = [int(t) for t in row[:length]]
            if args.eos_id is not None and row and row[-1] == args.eos_id:
                row = row[:-1]
            print(_escape(text + _decode_tokens(row)))
    print(f"{int(result.lengths.sum())} tokens in {seconds:.2f} s "
          f"({len(prompts)} sequence{'s' if len(prompts) > 1 else ''}, includes compilation)",
          file=sys.stderr)
    return 0


def _generation_model(args: argparse.Namespace):
    if args.checkpoint is not None:
        return _checkpoint_model(args.checkpoint, args.step)
    if args.step is not None:
        raise CommandError("--step selects a checkpoint of a training workdir: give --checkpoint")
    from flax import nnx

    from mythos_jax.model import OpenMythos
    from mythos_jax.variants import get_variant

    return OpenMythos(get_variant(args.variant), rngs=nnx.Rngs(args.seed))


def _checkpoint_model(path: str, step: int | None):
    """The model at ``path`` (any form ``load_model`` reads); what it is goes to stderr."""
    from mythos_jax import checkpoint

    if not os.path.exists(path):
        raise CommandError(f"{path}: no such file or directory")
    model, source = checkpoint.load_model_and_source(path, step=step)
    print(f"model: {source}", file=sys.stderr, flush=True)
    return model


def _escape(text: str, keep: str = "") -> str:
    """Control characters (newlines too, unless in ``keep``) as escapes: one safe line."""
    import unicodedata

    return "".join(c if c in keep or not unicodedata.category(c).startswith("C")
                   else c.encode("unicode_escape").decode("ascii") for c in text)


def _decode_tokens(tokens: Sequence[int]) -> str:
    """Byte tokens -> text (invalid UTF-8 -> U+FFFD); ids >= 256 become ``<id>``."""
    out, run = [], bytearray()
    for token in tokens:
        if token < 256:
            run.append(token)
            continue
        out.append(run.decode("utf-8", errors="replace"))
        run = bytearray()
        out.append(f"<{token}>")
    out.append(run.decode("utf-8", errors="replace"))
    return "".join(out)


class _ByteStream:
    """Writes one sequence's byte tokens as text while they arrive (incremental UTF-8, so a
    character split over several tokens prints whole); stops at ``eos_id``."""

    def __init__(self, stream, eos_id: int | None):
        import codecs

        self.stream, self.eos_id, self.done = stream, eos_id, False
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write_text(self, text: str) -> None:
        self.stream.write(_escape(text, keep="\n\t"))

    def push(self, token: int) -> None:
        if self.done:
            return
        if self.eos_id is not None and token == self.eos_id:
            self.done = True
            return
        if token < 256:
            self.write_text(self.decoder.decode(bytes([token])))
        else:
            self.write_text(self.decoder.decode(b"", final=True) + f"<{token}>")
            self.decoder.reset()
        self.stream.flush()

    def close(self) -> None:
        self.write_text(self.decoder.decode(b"", final=True))


def _one_line(err: BaseException) -> str:
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def _add_train(subparsers) -> None:
    from mythos_jax.train.commands import add_train
    add_train(subparsers)


def _add_eval(subparsers) -> None:
    from mythos_jax.train.commands import add_eval
    add_eval(subparsers)


def _module_command(name: str, module: str, help: str):
    """A subcommand whose module defines ``add_arguments(parser)`` and ``run(args) -> int``
    (imported when the parser is built)."""
    def add(subparsers) -> None:
        import importlib
        command = importlib.import_module(module)
        parser = subparsers.add_parser(name, help=help, description=command.__doc__)
        command.add_arguments(parser)
        parser.set_defaults(func=command.run)
    return add


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_train, _add_eval,
    _module_command("prepare-data", "mythos_jax.train.prepare_data",
                    "tokenise text/JSONL files into ArrayRecord shards"),
    _module_command("plan", "mythos_jax.plan",
                    "compile a training step for a TPU slice on this host: does it fit?"),
    _module_command("experiment", "mythos_jax.experiments.command",
                    "run an experiment (depth extrapolation, test-time depth, stability)"),
    _module_command("convert", "mythos_jax.commands.convert",
                    "convert a model: training run / model checkpoint / .pt / .safetensors"),
    _module_command("export", "mythos_jax.commands.convert",
                    "write a training run's model as a standalone checkpoint or OpenMythos file"),
    _add_parity, _add_generate]


if __name__ == "__main__":
    sys.exit(main())
