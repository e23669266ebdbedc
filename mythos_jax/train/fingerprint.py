"""What a run's data is, stored in every checkpoint and checked on resume.

    saved = data_fingerprint(cfg.data)                  # JSON-able, written with the state
    problems = data_changes(saved, data_fingerprint(cfg.data))

LM sources: every corpus file (path and size; the tokenizer.json too; for "arrayrecord" each
directory's metadata, lengths and shards) and, per split ("train", "heldout"), its documents,
tokens, windows and a digest of which document ranges (one document per file: which files)
it holds. Config fields alone cannot see
a glob that now matches other files or a stdlib that changed with the Python version; this
can. Task sources are generated from the config (already compared), so theirs is the source
name only.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from mythos_jax.train import corpus
from mythos_jax.train.data import lm_streams
from mythos_jax.train.data_config import TASK_SOURCES, DataConfig

SPLIT_FIELDS = ("documents", "tokens", "windows", "digest")


def data_fingerprint(cfg: DataConfig) -> dict[str, Any]:
    """The fingerprint of ``cfg``'s data (see the module docstring)."""
    if cfg.source in TASK_SOURCES:
        return {"source": cfg.source}
    train, held = lm_streams(cfg)
    return {"source": cfg.source,
            "files": [[path, os.path.getsize(path)] for path in corpus_files(cfg)],
            "train": _split(train), "heldout": _split(held)}


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
    old, new = dict(saved.get("files", [])), dict(current.get("files", []))
    for what, names in (("added", [p for p in new if p not in old]),
                        ("removed", [p for p in old if p not in new]),
                        ("changed size", [p for p in new if p in old and new[p] != old[p]])):
        if names:
            more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
            changes.append(f"files {what}: {', '.join(names[:3])}{more}")
    for split in ("train", "heldout"):
        for name in SPLIT_FIELDS:
            was, now = saved.get(split, {}).get(name), current.get(split, {}).get(name)
            if was != now:
                changes.append(f"{split}.{name}: checkpoint {was}, now {now}")
    return changes


def heldout_moved(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether the held-out split is another one than the checkpoint's."""
    return saved.get("heldout") != current.get("heldout")
