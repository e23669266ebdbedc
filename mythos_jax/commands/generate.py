"""Generate text in the model's own vocabulary: the tokenizer.json stored with a run or a model
checkpoint (``--tokenizer`` gives one), else byte level for a byte-level run, a model of 256-258
ids or a ``--variant``; a checkpoint whose tokenizer is unknown is refused, never read as bytes.
Byte level: each prompt is its UTF-8 bytes (token id = byte value) and generated ids < 256 are
decoded back as bytes (invalid UTF-8 becomes U+FFFD, control characters are escaped, ids >= 256
print as <id>). With a tokenizer.json, generation stops at its EOS unless ``--eos-id`` says
otherwise. One prompt: the text is streamed to stdout as it is generated. Several prompts: the
first is streamed to stderr, then stdout gets one line per prompt (prompt + continuation,
newlines escaped).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from mythos_jax.errors import CommandError

DEFAULT_NEW_TOKENS = 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                   help="prompt text; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="tokens to generate per prompt (default 64, fewer if the model's "
                        "max_seq_len leaves less room after the prompt)")
    add_sampling_arguments(p)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model, its tokenizer and its depth (``generate``, ``chat``)."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="PATH",
                        help="a training workdir (its newest readable checkpoint, or --step), "
                             "a training checkpoint WORKDIR/checkpoints/N, a model checkpoint "
                             "or OpenMythos weights (.pt/.pth/.safetensors)")
    source.add_argument("--variant", metavar="NAME",
                        help="a named config (mythos_jax.variants, e.g. tiny_mla) with "
                             "random weights drawn from --seed")
    p.add_argument("--step", type=int, metavar="N", help="checkpoint step of a training workdir")
    p.add_argument("--tokenizer", metavar="SPEC",
                   help="'bytes' or a tokenizer.json (default: the one stored with the model)")
    p.add_argument("--loops", "--n-loops", dest="loops", type=int, metavar="N",
                   help="loops per token (default: the config's max_loop_iters); --n-loops "
                        "is OpenMythos's name")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """Sampling, EOS and seed (``generate``, ``chat``)."""
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature; 0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, metavar="K", help="sample from the K likeliest tokens")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling, P in (0, 1]")
    p.add_argument("--eos-id", type=int, metavar="ID",
                   help="stop a sequence after this token (not printed)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random weights (--variant) and of the sampling")


def run(args: argparse.Namespace) -> int:
    """Generation in the model's vocabulary; streams the first sequence (see the module
    docstring)."""
    import time

    from mythos_jax.inference.generate import check_generation_args, generate

    if any(not text for text in args.prompt):
        raise CommandError("--prompt must not be empty")
    model, vocab = generation_model_and_vocab(args)
    cfg = model.cfg
    prompts = [[int(i) for i in ids] for ids in vocab.encode_batch(args.prompt)]
    if any(not p for p in prompts):
        raise CommandError(f"a --prompt encodes to no token with {vocab.name}")
    longest = max(len(p) for p in prompts)
    if longest >= cfg.max_seq_len:
        raise CommandError(f"prompt of {longest} tokens leaves no room for new tokens: the "
                           f"model's max_seq_len is {cfg.max_seq_len}")
    max_new_tokens = (min(DEFAULT_NEW_TOKENS, cfg.max_seq_len - longest)
                      if args.max_new_tokens is None else args.max_new_tokens)
    eos_id = generation_eos(args, vocab, cfg.vocab_size)
    # Every argument error before the first byte of output.
    check_generation_args(cfg, longest, max_new_tokens, args.temperature, args.top_k,
                          args.top_p, eos_id)

    single = len(prompts) == 1
    stream = sys.stdout if single else sys.stderr
    printer = token_printer(stream, eos_id, vocab, prompts[0])
    if single:
        printer.write_text(args.prompt[0])
    else:
        stream.write("[0] " + _escape(args.prompt[0]))
    stream.flush()

    start = time.perf_counter()
    result = generate(model, prompts, max_new_tokens, args.loops,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                      eos_id=eos_id, seed=args.seed,
                      on_token=lambda tokens: printer.push(int(tokens[0])))
    seconds = time.perf_counter() - start
    printer.close()
    stream.write("\n")
    stream.flush()
    if not single:
        for text, prompt, row, length in zip(args.prompt, prompts, result.tokens,
                                             result.lengths):
            row = [int(t) for t in row[:length]]
            if eos_id is not None and row and row[-1] == eos_id:
                row = row[:-1]
            print(_escape(text + _decode_tokens(row) if vocab.name == "bytes"
                          else vocab.decode(prompt + row)))
    print(f"{int(result.lengths.sum())} tokens in {seconds:.2f} s "
          f"({len(prompts)} sequence{'s' if len(prompts) > 1 else ''}, includes compilation)",
          file=sys.stderr)
    return 0


def generation_model_and_vocab(args: argparse.Namespace):
    """The model and the vocabulary its prompts are encoded in, after the common argument
    checks (``CommandError`` naming the flag)."""
    if getattr(args, "max_new_tokens", None) is not None and args.max_new_tokens < 1:
        raise CommandError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.loops is not None and args.loops < 1:
        raise CommandError(f"--loops must be >= 1, got {args.loops}")
    model = _generation_model(args)
    return model, _generation_vocab(args, model.cfg.vocab_size)


def generation_eos(args: argparse.Namespace, vocab, vocab_size: int) -> int | None:
    """``--eos-id``, else the tokenizer's EOS (byte level: none)."""
    if args.eos_id is None and vocab.name != "bytes" and vocab.eos_id < vocab_size:
        return vocab.eos_id
    return args.eos_id


def token_printer(stream, eos_id: int | None, vocab, prompt: list[int]) -> "_TokenStream":
    """A stream that writes one sequence's tokens as text while they arrive."""
    return (_ByteStream(stream, eos_id) if vocab.name == "bytes"
            else _TextStream(stream, eos_id, vocab, prompt))


def _generation_model(args: argparse.Namespace):
    if args.checkpoint is not None:
        from mythos_jax.commands.model_source import checkpoint_model

        return checkpoint_model(args.checkpoint, args.step)
    if args.step is not None:
        raise CommandError("--step selects a checkpoint of a training workdir: give --checkpoint")
    from flax import nnx

    from mythos_jax.model import OpenMythos
    from mythos_jax.variants import get_variant

    return OpenMythos(get_variant(args.variant), rngs=nnx.Rngs(args.seed))


def _generation_vocab(args: argparse.Namespace, vocab_size: int):
    """The vocabulary prompts are encoded in (see the module docstring)."""
    from mythos_jax.checkpoints.load import prompt_vocab

    try:
        return prompt_vocab(args.checkpoint, vocab_size, args.tokenizer)
    except ValueError as err:
        raise CommandError(str(err)) from None


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


class _TokenStream:
    """Writes one sequence's tokens as text while they arrive (``_add``), up to ``eos_id``."""

    def __init__(self, stream, eos_id: int | None):
        self.stream, self.eos_id, self.done = stream, eos_id, False

    def write_text(self, text: str) -> None:
        self.stream.write(_escape(text, keep="\n\t"))

    def push(self, token: int) -> None:
        if self.done:
            return
        if self.eos_id is not None and token == self.eos_id:
            self.done = True
            return
        self._add(token)
        self.stream.flush()

    def _add(self, token: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _ByteStream(_TokenStream):
    """Byte tokens, decoded as incremental UTF-8 (a character split over several tokens
    prints whole); ids >= 256 as ``<id>``."""

    def __init__(self, stream, eos_id: int | None):
        import codecs

        super().__init__(stream, eos_id)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _add(self, token: int) -> None:
        if token < 256:
            self.write_text(self.decoder.decode(bytes([token])))
        else:
            self.write_text(self.decoder.decode(b"", final=True) + f"<{token}>")
            self.decoder.reset()

    def close(self) -> None:
        self.write_text(self.decoder.decode(b"", final=True))


class _TextStream(_TokenStream):
    """tokenizer.json tokens, each decoded in the window of the tokens since the last text
    written (so a token costs the window, not the sequence so far): the text past that
    window's start is written once it ends in whole characters (byte-fallback pieces wait for
    the rest of theirs), with the separator the tokenizer puts before it."""

    def __init__(self, stream, eos_id: int | None, vocab, prompt: list[int]):
        super().__init__(stream, eos_id)
        self.vocab, self.ids = vocab, list(prompt)
        self.start, self.written = 0, len(self.ids)   # window start; ids whose text is out

    def _add(self, token: int) -> None:
        self.ids.append(token)
        self._write_new(complete_only=True)

    def close(self) -> None:
        self._write_new(complete_only=False)

    def _write_new(self, complete_only: bool) -> None:
        before = self.vocab.decode(self.ids[self.start:self.written])
        text = self.vocab.decode(self.ids[self.start:])
        if len(text) > len(before) and not (complete_only and text.endswith("\ufffd")):
            self.write_text(text[len(before):])
            self.start, self.written = self.written, len(self.ids)
