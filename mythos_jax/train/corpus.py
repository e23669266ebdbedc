"""Documents on disk or in memory, a held-out split, and their packed token stream.

A *store* holds documents with random access: ``lengths`` (n_docs,) and
``read(doc, lo, hi) -> (hi - lo,)`` token ids. ``FileStore`` (one document per file, bytes read
lazily with a seek: the stdlib corpus starts in a fraction of a second), ``ArrayStore`` (tokens
in memory) and ``ArrayRecordStore`` (``mythos-jax prepare-data`` shards) are the three kinds.

``PackedStream`` concatenates a store's documents as ``doc_0 EOS doc_1 EOS ...`` and cuts it into
windows of ``seq_len + 1`` tokens with stride ``seq_len`` (consecutive windows share one token,
so every token is a target exactly once); the last window is padded with PAD.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from typing import Iterator, Sequence

import numpy as np

GLOB_CHARS = "*?["
ARRAYRECORD_METADATA = "metadata.json"
ARRAYRECORD_LENGTHS = "lengths.npy"
ARRAYRECORD_FORMAT = "mythos-jax-documents-v1"
ARRAYRECORD_DTYPES = ("|u1", "<u2", "<u4")     # the token dtypes prepare-data writes


# ---------------------------------------------------------------------------- locating files
def stdlib_files() -> list[str]:
    """The standard library's own ``.py`` files (site-/dist-packages excluded), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages"))
        found.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    if not found:
        raise FileNotFoundError(f"DataConfig.source='stdlib': no .py files under {root}")
    return sorted(found)


def expand_paths(patterns: Sequence[str], field: str = "DataConfig.paths",
                 directories: bool = False) -> list[str]:
    """Files (or, with ``directories``, directories) named by ``patterns``: each a path or a
    glob (``**`` recursive), matches sorted, duplicates dropped, order of patterns kept."""
    kind = "directory" if directories else "file"
    is_kind = os.path.isdir if directories else os.path.isfile
    found: dict[str, None] = {}
    for pattern in patterns:
        if any(c in pattern for c in GLOB_CHARS):
            matches = [p for p in sorted(glob.glob(pattern, recursive=True)) if is_kind(p)]
            if not matches:
                raise FileNotFoundError(f"{field}: no {kind} matches {pattern!r}")
        elif is_kind(pattern):
            matches = [pattern]
        else:
            state = "is not a " + kind if os.path.exists(pattern) else "does not exist"
            raise FileNotFoundError(f"{field}: {pattern!r} {state}")
        found.update(dict.fromkeys(matches))
    return list(found)


def iter_documents(paths: Sequence[str], jsonl_field: str | None) -> Iterator[str | bytes]:
    """Documents of ``paths``: each file's bytes (``jsonl_field`` None) or, for JSON lines, the
    string field ``jsonl_field`` of every non-blank line. ValueError names file and line."""
    for path in paths:
        if jsonl_field is None:
            with open(path, "rb") as f:
                yield f.read()
            continue
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: not UTF-8 text ({err.reason} at "
                                     f"byte {err.start} of the line)") from None
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: invalid JSON ({err.msg})") from None
                if not isinstance(record, dict) or jsonl_field not in record:
                    raise ValueError(f"{path}:{line_no}: no field {jsonl_field!r} "
                                     "(DataConfig.jsonl_field)")
                if not isinstance(record[jsonl_field], str):
                    raise ValueError(f"{path}:{line_no}: field {jsonl_field!r} is a "
                                     f"{type(record[jsonl_field]).__name__}, not a string")
                yield record[jsonl_field]


# ---------------------------------------------------------------------------- stores
class FileStore:
    """One document per file; tokens = the file's bytes, read on demand."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)
        self.lengths = np.array([os.path.getsize(p) for p in self.paths], np.int64)

    def read(self, doc: int, lo: int, hi: int) -> np.ndarray:
        with open(self.paths[doc], "rb") as f:
            f.seek(lo)
            return np.frombuffer(f.read(hi - lo), np.uint8)


class ArrayStore:
    """Tokenised documents held in memory as one flat array plus offsets."""

    def __init__(self, docs: Sequence[np.ndarray]):
        self.lengths = np.array([len(d) for d in docs], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.tokens = np.concatenate(docs) if docs else np.zeros(0, np.int32)

    def read(self, doc: int, lo: int, hi: int) -> np.ndarray:
        start = self.offsets[doc]
        return self.tokens[start + lo:start + hi]


class ArrayRecordStore:
    """Documents written by ``mythos-jax prepare-data`` (one record per document) in one or more
    output directories, read through ``grain.sources.ArrayRecordDataSource``."""

    def __init__(self, directories: Sequence[str]):
        import grain

        metas = [read_arrayrecord_metadata(d) for d in directories]
        keys = ("tokenizer", "vocab_size", "eos_id", "pad_id", "dtype")
        for d, meta in zip(directories[1:], metas[1:]):
            if any(meta[k] != metas[0][k] for k in keys):
                raise ValueError(f"DataConfig.paths: {d} was prepared with another tokenizer "
                                 f"than {directories[0]} ({', '.join(keys)} must agree)")
        self.directories = list(directories)
        self.dtype = np.dtype(metas[0]["dtype"])
        self.lengths = np.concatenate([_read_lengths(d, m) for d, m in zip(directories, metas)])
        shards = [os.path.join(d, s["file"]) for d, m in zip(directories, metas)
                  for s in m["shards"]]
        self.source = grain.sources.ArrayRecordDataSource(shards)
        if len(self.source) != len(self.lengths):
            raise ValueError(f"DataConfig.paths: {list(directories)} hold {len(self.source)} "
                             f"records but their {ARRAYRECORD_LENGTHS} lists "
                             f"{len(self.lengths)}")

    def read(self, doc: int, lo: int, hi: int) -> np.ndarray:
        record = self.source[doc]
        if len(record) != self.lengths[doc] * self.dtype.itemsize:
            raise ValueError(f"DataConfig.paths: record {doc} of {self.directories} has "
                             f"{len(record)} bytes, but {ARRAYRECORD_LENGTHS} says "
                             f"{self.lengths[doc]} tokens of {self.dtype.itemsize} byte(s)")
        return np.frombuffer(record, self.dtype)[lo:hi]


def read_arrayrecord_metadata(directory: str) -> dict:
    """The ``metadata.json`` of a prepare-data output; FileNotFoundError if absent."""
    path = os.path.join(directory, ARRAYRECORD_METADATA)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DataConfig.paths: {directory!r} has no {ARRAYRECORD_METADATA}"
                                " (not a complete `mythos-jax prepare-data` output)")
    with open(path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"DataConfig.paths: {path} is not valid JSON ({err.msg})") from None
    if not isinstance(meta, dict) or meta.get("format") != ARRAYRECORD_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else meta
        raise ValueError(f"DataConfig.paths: {path} has format {found!r}, "
                         f"expected {ARRAYRECORD_FORMAT!r}")
    _check_metadata(path, meta)
    return meta


def _check_metadata(path: str, meta: dict) -> None:
    """``ValueError`` naming the field of a ``metadata.json`` that breaks a rule: token dtype
    in the allowlist, ids in range, shards plain file names inside the directory."""
    def fail(field: str, rule: str):
        raise ValueError(f"DataConfig.paths: {path}: {field} {rule}, got {meta.get(field)!r}")

    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if meta.get("dtype") not in ARRAYRECORD_DTYPES:
        fail("dtype", f"must be one of {ARRAYRECORD_DTYPES}")
    if not isinstance(meta.get("tokenizer"), str):
        fail("tokenizer", "must be a string")
    size, top = meta.get("vocab_size"), int(np.iinfo(np.dtype(meta["dtype"])).max) + 3
    if not count(size) or not 0 < size <= top:      # EOS and PAD may follow the ids
        fail("vocab_size", f"must be an int in [1, {top}] for dtype {meta['dtype']}")
    for field in ("eos_id", "pad_id"):
        if not count(meta.get(field)) or meta[field] >= size:
            fail(field, f"must be an int in [0, vocab_size={size})")
    shards = meta.get("shards")
    if not isinstance(shards, list) or not all(
            isinstance(s, dict) and count(s.get("records")) and isinstance(s.get("file"), str)
            and s["file"] == os.path.basename(s["file"]) and s["file"] not in ("", ".", "..")
            for s in shards):
        fail("shards", "must list {file, records} with plain file names inside the directory")


def _read_lengths(directory: str, meta: dict) -> np.ndarray:
    """``lengths.npy`` of a prepare-data output, checked against its metadata: (n,) integers
    >= 0, one per record, summing to ``num_tokens``."""
    path = os.path.join(directory, ARRAYRECORD_LENGTHS)
    lengths = np.load(path, allow_pickle=False)
    records = sum(s["records"] for s in meta["shards"])
    if lengths.ndim != 1 or lengths.dtype.kind not in "iu" or (lengths < 0).any():
        raise ValueError(f"DataConfig.paths: {path} must be a 1-D array of token counts "
                         f">= 0, got {lengths.dtype} of shape {lengths.shape}")
    if len(lengths) != records or int(lengths.sum()) != meta.get("num_tokens"):
        raise ValueError(f"DataConfig.paths: {path} lists {len(lengths)} documents of "
                         f"{int(lengths.sum())} tokens, metadata.json {records} of "
                         f"{meta.get('num_tokens')}")
    return lengths.astype(np.int64)


class DocView:
    """Token ranges ``[lo, hi)`` of chosen documents of a store, seen as documents."""

    def __init__(self, store, doc_ids: np.ndarray, lo: np.ndarray, hi: np.ndarray):
        self.store, self.doc_ids, self.lo = store, doc_ids, lo
        self.lengths = hi - lo

    def read(self, doc: int, lo: int, hi: int) -> np.ndarray:
        base = self.lo[doc]
        return self.store.read(int(self.doc_ids[doc]), base + lo, base + hi)


def split_documents(store, eval_fraction: float, seed: int) -> tuple[DocView, DocView]:
    """(train, held-out): a seeded random ``eval_fraction`` of the non-empty documents (at
    least one) is held out; a single document is split instead, its tail held out."""
    ids = np.flatnonzero(store.lengths > 0)
    if len(ids) == 0:
        raise ValueError("DataConfig.paths: the corpus is empty (no document has any token)")
    lengths = store.lengths[ids]
    zeros = np.zeros(len(ids), np.int64)
    if eval_fraction == 0:
        return DocView(store, ids, zeros, lengths), DocView(store, ids[:0], zeros[:0], zeros[:0])
    if len(ids) == 1:
        cut = lengths - np.maximum(1, np.round(lengths * eval_fraction).astype(np.int64))
        return DocView(store, ids, zeros, cut), DocView(store, ids, cut, lengths)
    n_eval = int(np.clip(round(eval_fraction * len(ids)), 1, len(ids) - 1))
    held = np.zeros(len(ids), bool)
    held[np.random.default_rng((seed, 0x5E1D)).choice(len(ids), n_eval, replace=False)] = True
    return (DocView(store, ids[~held], zeros[~held], lengths[~held]),
            DocView(store, ids[held], zeros[held], lengths[held]))


# ---------------------------------------------------------------------------- packing
class PackedStream:
    """``doc_0 EOS doc_1 EOS ...`` of a store, cut into windows of ``seq_len + 1`` tokens."""

    def __init__(self, docs, seq_len: int, eos_id: int, pad_id: int):
        self.docs, self.seq_len, self.eos_id, self.pad_id = docs, seq_len, eos_id, pad_id
        self.starts = np.concatenate([[0], np.cumsum(docs.lengths + 1)])   # (n_docs + 1,)
        self.num_tokens = int(self.starts[-1])
        self.num_windows = -(-(self.num_tokens - 1) // seq_len) if self.num_tokens > 1 else 0

    def window(self, index: int) -> tuple[np.ndarray, int]:
        """Window ``index``: (tokens (seq_len + 1,) int32 with PAD past the stream, how many
        are real)."""
        out = np.full(self.seq_len + 1, self.pad_id, np.int32)
        pos = index * self.seq_len
        filled = 0
        doc = int(np.searchsorted(self.starts, pos, side="right")) - 1
        while filled < len(out) and doc < len(self.docs.lengths):
            lo, length = pos - int(self.starts[doc]), int(self.docs.lengths[doc])
            take = min(length - lo, len(out) - filled)
            if take > 0:
                out[filled:filled + take] = self.docs.read(doc, lo, lo + take)
                filled, pos = filled + take, pos + take
            if filled < len(out):      # the window reaches this document's EOS
                out[filled] = self.eos_id
                filled, pos = filled + 1, pos + 1
            doc += 1
        return out, filled
