"""Talk to a model: each line read from stdin is a turn, the reply streams to stdout, and the
KV cache is kept between turns (only the new tokens are run, never the conversation again).
A turn is the line's text and a newline, in the model's vocabulary (see ``generate``); the
reply ends at the tokenizer's EOS (or ``--eos-id``) or after ``--max-new-tokens``. An empty
line or end of input ends the conversation, as does a full cache (``--max-len``).
"""

from __future__ import annotations

import argparse
import sys

from mythos_jax.commands.generate import (add_model_arguments, add_sampling_arguments,
                                          generation_eos, generation_model_and_vocab,
                                          token_printer)
from mythos_jax.errors import CommandError


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="tokens per reply at most (default 64)")
    p.add_argument("--max-len", type=int, metavar="N",
                   help="tokens the whole conversation may hold (default: max_seq_len)")
    add_sampling_arguments(p)


def run(args: argparse.Namespace) -> int:
    """Read turns from stdin until an empty line or end of input; stream each reply."""
    from mythos_jax.inference.generate import check_token_args, generate

    model, vocab = generation_model_and_vocab(args)
    cfg = model.cfg
    max_len = cfg.max_seq_len if args.max_len is None else args.max_len
    if not 2 <= max_len <= cfg.max_seq_len:
        raise CommandError(f"--max-len must be in [2, max_seq_len={cfg.max_seq_len}], got "
                           f"{max_len}")
    eos_id = generation_eos(args, vocab, cfg.vocab_size)
    check_token_args(cfg, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                     eos_id)
    interactive = sys.stdin.isatty()
    context, written, turn = None, 0, 0      # written: cache slots used so far
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        tokens = [int(i) for i in vocab.encode_batch([line.rstrip("\n") + "\n"])[0]]
        room = max_len - written - len(tokens)      # a next turn also feeds its pending token
        if room < 1:
            print(f"the conversation filled its {max_len} tokens (--max-len)", file=sys.stderr)
            return 0
        printer = token_printer(sys.stdout, eos_id, vocab, tokens)
        result = generate(model, [tokens], min(args.max_new_tokens, room), args.loops,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          eos_id=eos_id, seed=args.seed + turn, max_len=max_len,
                          on_token=lambda new: printer.push(int(new[0])), context=context,
                          keep_cache=True)
        printer.close()
        print(flush=True)
        context, turn = result.context, turn + 1
        written = int(context.cache.index.max())
