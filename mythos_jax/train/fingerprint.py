"""What a run's data is, stored in every checkpoint and checked on resume.

    saved = data_fingerprint(cfg.data)                  # JSON-able, written with the state
    problems = data_changes(saved, data_fingerprint(cfg.data))

LM sources: every corpus file (path, size and a SHA-256 of its content, so a same-size edit
shows; the tokenizer.json too; for "arrayrecord" each directory's metadata, lengths and shards)
and, per split ("train", "heldout"), its documents,
tokens, windows and a digest of which document ranges (one document per file: which files)
it holds. Config fields alone cannot see
a glob that now matches other files or a stdlib that changed with the Python version; this
can. Task sources are generated from the config (already compared), so theirs is the source
name only.

A file's digest is computed once: it is cached in ``$MYTHOS_JAX_DIGESTS`` (default
``~/.cache/mythos-jax/file-digests.json``) under its path, size and modification time, so a
resume reads a large corpus again only where a file changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from mythos_jax import paths
from mythos_jax.train import corpus
from mythos_jax.train.data import lm_streams
from mythos_jax.train.data_config import TASK_SOURCES, DataConfig

SPLIT_FIELDS = ("documents", "tokens", "windows", "digest")
DIGEST_CACHE = os.environ.get("MYTHOS_JAX_DIGESTS") or os.path.join(
    os.path.expanduser("~"), ".cache", "mythos-jax", "file-digests.json")


def data_fingerprint(cfg: DataConfig) -> dict[str, Any]:
    """The fingerprint of ``cfg``'s data (see the module docstring)."""
    if cfg.source in TASK_SOURCES:
        return {"source": cfg.source}
    train, held = lm_streams(cfg)
    files = corpus_files(cfg)
    digests = file_digests(files)
    return {"source": cfg.source,
            "files": [[path, os.path.getsize(path), digests[path]] for path in files],
            "train": _split(train), "heldout": _split(held)}


def file_digests(files: list[str], cache_path: str | None = None) -> dict[str, str]:
    """path -> SHA-256 (hex, 16 digits) of each file's content; read from the cache when the
    file's size and modification time are those cached, else computed and cached."""
    cache_path = cache_path or DIGEST_CACHE
    try:
        with open(cache_path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    found, stale = {}, False
    for path in files:
        stat = os.stat(path)
        key = f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}"
        if not isinstance(cache.get(key), str):
            cache[key], stale = _sha256(path), True
        found[path] = cache[key]
    if stale:
        try:
            os.makedirs(os.path.dirname(cache_path), exist_ok=True)
            paths.write_text(cache_path, json.dumps(cache))
        except OSError:
            pass                        # a read-only home: the digests are recomputed next time
    return found


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def corpus_files(cfg: DataConfig) -> list[str]:
    """Every local file the LM source of ``cfg`` reads."""
    if cfg.source == "stdlib":
        return corpus.stdlib_files()
    if cfg.source == "arrayrecord":
        files = []
        for directory in corpus.expand_paths(cfg.paths, directories=True):
            meta = corpus.read_arrayrecord_metadata(directory)
            files += [os.path.join(directory, name) for name in
                      (corpus.ARRAYRECORD_METADATA, corpus.ARRAYRECORD_LENGTHS,
                       *(shard["file"] for shard in meta["shards"]))]
        return files
    tokenizer = [] if cfg.tokenizer == "bytes" else [cfg.tokenizer]
    return corpus.expand_paths(cfg.paths) + tokenizer


def _split(stream: corpus.PackedStream) -> dict[str, Any]:
    view = stream.docs
    digest = hashlib.sha256()
    for array in (view.doc_ids, view.lo, view.lengths):
        digest.update(np.asarray(array, np.int64).tobytes())
    if hasattr(view.store, "paths"):            # one document per file: which files
        digest.update("\0".join(view.store.paths[i] for i in view.doc_ids).encode())
    return {"documents": len(view.lengths), "tokens": stream.num_tokens,
            "windows": stream.num_windows, "digest": digest.hexdigest()[:16]}


def data_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, one phrase each ([] when they agree)."""
    changes = []
    if saved.get("source") != current.get("source"):
        return [f"source: checkpoint {saved.get('source')!r}, now {current.get('source')!r}"]
    old, new = (_by_path(f.get("files", [])) for f in (saved, current))
    shared = [p for p in new if p in old]
    for what, names in (("added", [p for p in new if p not in old]),
                        ("removed", [p for p in old if p not in new]),
                        ("changed size", [p for p in shared if new[p][0] != old[p][0]]),
                        ("changed content", [p for p in shared if new[p][0] == old[p][0]
                                             and None not in (new[p][1], old[p][1])
                                             and new[p][1] != old[p][1]])):
        if names:
            more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
            changes.append(f"files {what}: {', '.join(names[:3])}{more}")
    for split in ("train", "heldout"):
        for name in SPLIT_FIELDS:
            was, now = saved.get(split, {}).get(name), current.get(split, {}).get(name)
            if was != now:
                changes.append(f"{split}.{name}: checkpoint {was}, now {now}")
    return changes


def _by_path(files: list) -> dict[str, tuple]:
    """path -> (size, digest or None): checkpoints written before digests hold [path, size]."""
    return {entry[0]: (entry[1], entry[2] if len(entry) > 2 else None) for entry in files}


def heldout_moved(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether the held-out split is another one than the checkpoint's."""
    return saved.get("heldout") != current.get("heldout")
