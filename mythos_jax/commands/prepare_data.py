"""``mythos-jax prepare-data``: tokenise text or JSONL files into ArrayRecord shards.

    mythos-jax prepare-data --input 'corpus/**/*.jsonl' --output data/corpus \\
        --tokenizer tokenizer.json --records-per-shard 50000

Output directory (read back with ``DataConfig(source="arrayrecord", paths=(DIR,))``):
  ``shard-00000.array_record ...``  one record per document: its token ids as raw little-endian
                                    ``dtype`` (uint8 for bytes, uint16 or uint32 otherwise),
                                    no EOS (the reader inserts it between documents)
  ``lengths.npy``                   tokens per document, in record order (int64)
  ``metadata.json``                 format, tokenizer, vocab_size, eos_id, pad_id, dtype, shards,
                                    document and token counts; written last, so a directory
                                    without it is an interrupted run
Documents are read and written one batch at a time, so the corpus never has to fit in memory.
Empty documents are skipped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import tempfile

import numpy as np

from mythos_jax.train import corpus
from mythos_jax.train.tokenizer import copy_tokenizer, load_vocab

ENCODE_CHUNK = 512      # documents tokenised per encode_batch call


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the prepare-data options on ``parser``."""
    parser.add_argument("--input", action="append", required=True, metavar="GLOB",
                        help="input file or glob (** recursive); repeat for more")
    parser.add_argument("--output", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--tokenizer", default="bytes",
                        help="'bytes' (default) or a HuggingFace tokenizer.json path")
    parser.add_argument("--format", choices=("auto", "text", "jsonl"), default="auto",
                        help="text: one document per file; jsonl: one per line; auto (default): "
                             "jsonl for *.jsonl files, text otherwise")
    parser.add_argument("--jsonl-field", default="text", metavar="FIELD",
                        help="text field of each JSON line (default: text)")
    parser.add_argument("--records-per-shard", type=int, default=100_000, metavar="N",
                        help="documents per ArrayRecord shard (default 100000)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the output directory if it exists")


def run(args: argparse.Namespace) -> int:
    """Run prepare-data with parsed ``args``; prints a summary and returns 0."""
    meta = prepare(args.input, args.output, tokenizer=args.tokenizer, fmt=args.format,
                   jsonl_field=args.jsonl_field, records_per_shard=args.records_per_shard,
                   overwrite=args.overwrite)
    print(f"wrote {meta['num_documents']:,} documents ({meta['num_tokens']:,} tokens, "
          f"{meta['skipped_empty']:,} empty skipped) in {len(meta['shards'])} shard(s) to "
          f"{args.output} (tokenizer {meta['tokenizer']}, vocab {meta['vocab_size']})")
    return 0


def prepare(inputs: list[str], output: str, tokenizer: str = "bytes", fmt: str = "auto",
            jsonl_field: str = "text", records_per_shard: int = 100_000,
            overwrite: bool = False) -> dict:
    """Write the shards, ``lengths.npy`` and ``metadata.json`` (returned) to ``output``: into
    a directory beside it first, which replaces ``output`` only once complete (with
    ``overwrite``, an earlier output stays in place until then)."""
    if records_per_shard < 1:
        raise ValueError(f"--records-per-shard must be >= 1, got {records_per_shard}")
    files = corpus.expand_paths(inputs, field="--input")
    vocab = load_vocab(tokenizer)
    _check_output(output, overwrite)
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=os.path.basename(os.path.abspath(output)) + ".partial-",
                               dir=parent)
    try:
        meta = _write_shards(files, vocab, fmt, jsonl_field, records_per_shard, staging, inputs)
        copy_tokenizer(vocab.name, staging)        # the shards' tokenizer travels with them
        _swap_in(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return meta


def _write_shards(files: list[str], vocab, fmt: str, jsonl_field: str, records_per_shard: int,
                  output: str, inputs: list[str]) -> dict:
    """Tokenise ``files`` into ``output`` (an empty directory); the metadata written last."""
    from array_record.python.array_record_module import ArrayRecordWriter

    dtype = np.dtype(np.uint8 if vocab.name == "bytes" else
                     np.uint16 if vocab.size <= 2**16 else np.uint32)
    lengths: list[int] = []
    shards: list[dict] = []
    skipped = 0
    writer = None
    for chunk in _chunks(_documents(files, fmt, jsonl_field), ENCODE_CHUNK):
        for ids in vocab.encode_batch(chunk):
            if len(ids) == 0:
                skipped += 1
                continue
            check_ids(ids, vocab.size, dtype, len(lengths) + skipped)
            if writer is None or shards[-1]["records"] == records_per_shard:
                if writer is not None:
                    writer.close()
                shards.append({"file": f"shard-{len(shards):05d}.array_record", "records": 0})
                writer = ArrayRecordWriter(os.path.join(output, shards[-1]["file"]),
                                           "group_size:1")
            writer.write(np.asarray(ids, dtype.newbyteorder("<")).tobytes())
            shards[-1]["records"] += 1
            lengths.append(len(ids))
    if writer is not None:
        writer.close()
    if not lengths:
        raise ValueError(f"--input: {inputs} hold no non-empty document")
    np.save(os.path.join(output, corpus.ARRAYRECORD_LENGTHS), np.asarray(lengths, np.int64))
    meta = {"format": corpus.ARRAYRECORD_FORMAT, "tokenizer": vocab.name,
            "vocab_size": vocab.size, "eos_id": vocab.eos_id, "pad_id": vocab.pad_id,
            "dtype": dtype.str, "shards": shards, "num_documents": len(lengths),
            "num_tokens": int(sum(lengths)), "skipped_empty": skipped, "inputs": files}
    tmp = os.path.join(output, corpus.ARRAYRECORD_METADATA + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(output, corpus.ARRAYRECORD_METADATA))
    return meta


def check_ids(ids: np.ndarray, vocab_size: int, dtype: np.dtype, doc: int) -> None:
    """``ValueError`` unless every id of document ``doc`` is in ``[0, vocab_size)`` and fits
    ``dtype`` (checked before the cast, which would wrap silently)."""
    low, high = int(np.min(ids)), int(np.max(ids))
    limit = min(vocab_size, int(np.iinfo(dtype).max) + 1)
    if low < 0 or high >= limit:
        raise ValueError(f"document {doc}: token id {low if low < 0 else high} is outside "
                         f"[0, {limit}) (vocab_size {vocab_size}, stored as {dtype.name})")


def _documents(files: list[str], fmt: str, jsonl_field: str):
    """Documents of each file, read as JSON lines or whole files per ``fmt``."""
    for path in files:
        jsonl = fmt == "jsonl" or (fmt == "auto" and path.endswith(".jsonl"))
        yield from corpus.iter_documents([path], jsonl_field if jsonl else None)


def _chunks(items, size: int):
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _check_output(output: str, overwrite: bool) -> None:
    """``output`` may receive the shards: absent, empty, or (with ``overwrite``) an earlier
    prepare-data output (only its own files: a directory holding anything else is refused)."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise FileExistsError(f"--output: {output} is a file, not a directory")
    existing = os.listdir(output) if os.path.isdir(output) else []
    if existing and not overwrite:
        raise FileExistsError(f"--output: {output} exists and is not empty "
                              "(use --overwrite to replace an earlier prepare-data output)")
    foreign = [name for name in existing if not _is_output_file(name)]
    if foreign:
        raise FileExistsError(f"--output: {output} holds files prepare-data did not write "
                              f"({', '.join(sorted(foreign)[:3])}); choose another directory")


def _swap_in(staging: str, output: str) -> None:
    """Put the complete ``staging`` directory in ``output``'s place; an earlier output is
    renamed aside first and deleted only after the new one is in place."""
    os.chmod(staging, 0o755)            # mkdtemp's 0700 would hide it from other users
    old = None
    if os.path.isdir(output):
        old = staging + ".replaced"
        os.rename(output, old)
    os.rename(staging, output)
    if old is not None:
        shutil.rmtree(old)


def _is_output_file(name: str) -> bool:
    return (name in (corpus.ARRAYRECORD_LENGTHS, corpus.ARRAYRECORD_METADATA,
                     corpus.ARRAYRECORD_METADATA + ".tmp")
            or (name.startswith("shard-") and name.endswith(".array_record")))
