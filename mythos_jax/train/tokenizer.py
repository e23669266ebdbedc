"""Vocabularies: byte-level (the default, no files) or a local HuggingFace ``tokenizer.json``.

Byte level: token id = byte value (0..255, as ``mythos-jax generate`` decodes), ``EOS = 256``
ends every document, ``PAD = 257`` fills rows past the data (its loss_mask is 0); vocab 258.

``tokenizer.json`` (read with the optional ``tokenizers`` package, imported only here): ids are
the tokenizer's own, encoded without its special-token templates (no BOS/CLS is added); the
vocabulary size is the largest id + 1 (ids may be sparse), so every id is below it. EOS is
the first of ``EOS_NAMES`` the vocabulary has, else a new id past the largest (never a real
one); PAD is the first of ``PAD_NAMES`` it has, else EOS (padding is masked out of the loss
either way).

A run, a ``prepare-data`` output and a model checkpoint carry their tokenizer as
``TOKENIZER_FILE`` (``copy_tokenizer``), so that they can be used where the original file is not.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from mythos_jax import paths

BYTE_EOS = 256
BYTE_PAD = 257
BYTE_VOCAB_SIZE = 258
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end_of_text|>")
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>")
TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass(frozen=True)
class Vocab:
    """A tokenizer with its special ids. ``name`` is "bytes" or the tokenizer.json path."""

    name: str
    size: int
    eos_id: int
    pad_id: int

    def encode_batch(self, docs: Sequence[str | bytes]) -> list[np.ndarray]:
        """Token ids of each document (no EOS added): a list of 1-D integer arrays."""
        if self.name == "bytes":
            return [np.frombuffer(d if isinstance(d, bytes) else d.encode("utf-8"), np.uint8)
                    for d in docs]
        texts = [d.decode("utf-8", errors="replace") if isinstance(d, bytes) else d for d in docs]
        encodings = _hf_tokenizer(self.name).encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; EOS/PAD and other ids outside the tokenizer are dropped."""
        ids = [int(i) for i in ids if i not in (self.eos_id, self.pad_id)]
        if self.name == "bytes":
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return _hf_tokenizer(self.name).decode([i for i in ids if i < self.size])


BYTES = Vocab("bytes", BYTE_VOCAB_SIZE, BYTE_EOS, BYTE_PAD)


def copy_tokenizer(source: str | os.PathLike | None, folder: str | os.PathLike) -> bool:
    """Copy the tokenizer.json at ``source`` (a path or URL; ``"bytes"`` or None: nothing to
    copy) into ``folder`` as ``TOKENIZER_FILE``, atomically; whether there was one."""
    if source is None or os.fspath(source) == "bytes":
        return False
    tokenizer = paths.resolve(source)
    if not tokenizer.is_file():
        return False
    paths.write_bytes(paths.join(folder, TOKENIZER_FILE), tokenizer.read_bytes())
    return True


def load_vocab(spec: str) -> Vocab:
    """``"bytes"`` or a path to a ``tokenizer.json``; FileNotFoundError / ImportError if the
    file or the ``tokenizers`` package is missing."""
    if spec == "bytes":
        return BYTES
    tokenizer = _hf_tokenizer(spec)
    size = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1
    eos = _first_id(tokenizer, EOS_NAMES)
    if eos is None:
        eos, size = size, size + 1
    pad = _first_id(tokenizer, PAD_NAMES)
    return Vocab(spec, size, eos, eos if pad is None else pad)


def _first_id(tokenizer, names: Sequence[str]) -> int | None:
    for name in names:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


_TOKENIZERS: dict[str, object] = {}


def _hf_tokenizer(path: str):
    """The ``tokenizers.Tokenizer`` of a tokenizer.json, loaded once per path."""
    if path not in _TOKENIZERS:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"DataConfig.tokenizer: {path!r} is not a file (expected "
                                    "'bytes' or a HuggingFace tokenizer.json)")
        try:
            from tokenizers import Tokenizer
        except ImportError as err:
            raise ImportError(f"DataConfig.tokenizer={path!r} needs the 'tokenizers' package: "
                              "pip install tokenizers") from err
        try:
            _TOKENIZERS[path] = Tokenizer.from_file(path)
        except Exception as err:  # the Rust side raises a bare Exception on a malformed file
            raise ValueError(f"DataConfig.tokenizer: cannot read {path!r} as a HuggingFace "
                             f"tokenizer.json ({err})") from err
    return _TOKENIZERS[path]
