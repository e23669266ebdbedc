"""Training and evaluation data through Grain: packed language-model windows or synthetic tasks.

Sources: the classes of :mod:`mythos_jax.train.data_config` (``data.source``).

Every batch is a dict of numpy arrays for one process, ``B = batch_size // process_count``:
  ``inputs`` int32 (B, seq_len), ``targets`` int32 (B, seq_len) (inputs shifted left by one),
  ``loss_mask`` float32 (B, seq_len): 1 where a target counts. LM sources pack documents as
  ``doc EOS doc EOS ...`` into windows of seq_len + 1 tokens; the mask is 1 except on padding.
  Task rows hold one example each, padded with PAD; the mask is 1 on the answer (and its EOS).

Order and sharding: the training stream is a Grain ``MapDataset`` of rows (LM: windows shuffled
with ``seed``, reshuffled every epoch, repeated forever; tasks: example i of the seeded train
stream). Global batch n is rows ``[n * batch_size, (n + 1) * batch_size)`` of it; process p
takes rows ``p * B .. (p + 1) * B - 1`` of each global batch, so the processes' batches
concatenated in process order are exactly the one-process batch. The iterator's
``get_state()`` is ``{"next_index": global batches consumed}`` (JSON, the same on every process
and valid for any process count) and ``set_state`` resumes exactly.

Held-out data: LM sources hold out a seeded ``eval_fraction`` of their documents (a single
document: its tail) as split "heldout"; its rows are ``eval_examples`` windows drawn at random
without replacement. Task splits ("hops=k", "digits=d") use their own seed stream, so they never
share a generator with training examples. Eval sets are rounded up to whole global batches; rows
past the data (LM only) are all PAD with a zero mask.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import grain
import numpy as np

from mythos_jax.train import corpus, tasks
from mythos_jax.train.data_config import TASK_SOURCES, DataConfig
from mythos_jax.train.tokenizer import BYTES, TOKENIZER_FILE, Vocab, load_vocab

TASK_STREAM_LENGTH = 2**62      # "infinite" train stream of task examples
Batch = dict[str, np.ndarray]


# ---------------------------------------------------------------------------- public API
def get_vocab(cfg: DataConfig) -> Vocab:
    """The vocabulary of ``cfg``'s tokens (sizes and special ids)."""
    if cfg.source == "arrayrecord":
        directory = corpus.expand_paths(cfg.paths, directories=True)[0]
        meta = corpus.read_arrayrecord_metadata(directory)
        copy = os.path.join(directory, TOKENIZER_FILE)     # prepare-data's copy, if any
        name = copy if meta["tokenizer"] != "bytes" and os.path.isfile(copy) else meta["tokenizer"]
        return Vocab(name, meta["vocab_size"], meta["eos_id"], meta["pad_id"])
    return BYTES if cfg.source in TASK_SOURCES else load_vocab(cfg.tokenizer)


def vocab_size(cfg: DataConfig) -> int:
    """Token ids are in ``[0, vocab_size(cfg))``: 258 byte-level, else the tokenizer's size
    (+1 when EOS had to be appended)."""
    return get_vocab(cfg).size


def eval_splits(cfg: DataConfig) -> tuple[str, ...]:
    """Names for ``eval_batches``: ("heldout",) for LM sources (() if eval_fraction is 0),
    ("hops=2", ...) for khop, ("digits=4", ...) for addition."""
    if cfg.source in ("khop", "khop_graph"):
        return tuple(f"hops={k}" for k in cfg.khop_eval_hops)
    if cfg.source == "addition":
        return tuple(f"digits={d}" for d in cfg.addition_eval_digits)
    return ("heldout",) if cfg.eval_fraction > 0 else ()


def train_iterator(cfg: DataConfig, process_index: int = 0,
                   process_count: int = 1) -> grain.DatasetIterator:
    """Endless iterator of this process's training batches (see the module docstring);
    supports ``get_state()`` / ``set_state(state)``."""
    local = _local_batch_size(cfg, process_index, process_count)
    batches = _train_rows(cfg).batch(local, drop_remainder=True)[process_index::process_count]
    options = grain.ReadOptions(num_threads=1 if cfg.prefetch else 0,
                                prefetch_buffer_size=cfg.prefetch)
    return iter(batches.to_iter_dataset(options))


def eval_batches(cfg: DataConfig, split_name: str, process_index: int = 0,
                 process_count: int = 1) -> list[Batch]:
    """All batches of eval split ``split_name`` for this process, same format as training."""
    if split_name not in eval_splits(cfg):
        raise ValueError(f"eval split {split_name!r}: {cfg.source!r} data has "
                         f"{eval_splits(cfg)}")
    local = _local_batch_size(cfg, process_index, process_count)
    num_rows = -(-cfg.eval_examples // cfg.batch_size) * cfg.batch_size
    if cfg.source in TASK_SOURCES:
        value = int(split_name.split("=")[1])
        make = functools.partial(_task_row, cfg, tasks.EVAL_STREAM, value)
    else:
        stream = lm_streams(cfg)[1]
        chosen = np.random.default_rng((cfg.seed, 0xE7A1)).choice(
            stream.num_windows, min(num_rows, stream.num_windows), replace=False)
        make = functools.partial(_eval_window_row, stream, chosen)
    rows = grain.MapDataset.range(num_rows).map(make)
    batches = rows.batch(local, drop_remainder=True)[process_index::process_count]
    return [batches[i] for i in range(len(batches))]


def answer_accuracy(pred_ids: Any, batch: Batch) -> tuple[float, float]:
    """(token accuracy, exact-match rate) of ``pred_ids`` (B, seq_len), the predicted next
    token at every position, against ``batch["targets"]`` where ``loss_mask`` is set. A row
    is an exact match when all its masked targets are right; rows without any mask (padding)
    are not counted."""
    mask = np.asarray(batch["loss_mask"]) > 0
    correct = (np.asarray(pred_ids) == np.asarray(batch["targets"])) & mask
    if not mask.any():
        raise ValueError("answer_accuracy: the batch has no loss_mask positions")
    rows = mask.any(axis=1)
    exact = correct.sum(axis=1) == mask.sum(axis=1)
    return float(correct.sum() / mask.sum()), float(exact[rows].mean())


def describe(cfg: DataConfig) -> str:
    """One line about the data, for logs."""
    vocab = get_vocab(cfg)
    if cfg.source in TASK_SOURCES:
        return (f"{cfg.source}: synthetic, vocab {vocab.size}, eval splits "
                f"{', '.join(eval_splits(cfg))}")
    train, held = lm_streams(cfg)
    return (f"{cfg.source}: {len(train.docs.lengths):,} train documents, "
            f"{train.num_tokens:,} tokens = {train.num_windows:,} windows of {cfg.seq_len}; "
            f"{len(held.docs.lengths):,} held-out documents ({held.num_tokens:,} tokens); "
            f"vocab {vocab.size} ({vocab.name})")


# ---------------------------------------------------------------------------- rows
def _train_rows(cfg: DataConfig) -> grain.MapDataset:
    """The endless training stream, one row dict per element."""
    if cfg.source in TASK_SOURCES:
        return grain.MapDataset.range(TASK_STREAM_LENGTH).map(
            functools.partial(_task_row, cfg, tasks.TRAIN_STREAM, 0))
    stream = lm_streams(cfg)[0]
    if stream.num_windows == 0:
        raise ValueError(f"DataConfig: the {cfg.source} training split has no tokens")
    return (grain.MapDataset.range(stream.num_windows).shuffle(seed=cfg.seed).repeat(None)
            .map(functools.partial(_window_row, stream)))


def _row(window: np.ndarray, loss_mask: np.ndarray) -> Batch:
    """A row from ``window`` (seq_len + 1,) and ``loss_mask`` (seq_len,)."""
    return {"inputs": window[:-1], "targets": window[1:],
            "loss_mask": loss_mask.astype(np.float32)}


def _window_row(stream: corpus.PackedStream, index: int) -> Batch:
    window, filled = stream.window(index)
    return _row(window, np.arange(stream.seq_len) < filled - 1)


def _eval_window_row(stream: corpus.PackedStream, chosen: np.ndarray, index: int) -> Batch:
    if index < len(chosen):
        return _window_row(stream, int(chosen[index]))
    pad = np.full(stream.seq_len + 1, stream.pad_id, np.int32)
    return _row(pad, np.zeros(stream.seq_len, bool))


def _task_row(cfg: DataConfig, stream: int, split_value: int, index: int) -> Batch:
    """Example ``index`` of a task stream; ``split_value`` is the eval hops/digits (0 = train,
    where they are drawn per example)."""
    graph_task = cfg.source == "khop_graph"
    seed = cfg.graph_seed if graph_task and stream == tasks.EVAL_STREAM else cfg.seed
    rng = tasks.example_rng(seed, stream, index, split_value)
    if cfg.source == "khop":
        hops = split_value or int(rng.integers(1, cfg.khop_train_max_hops + 1))
        tokens, answer_start = tasks.khop_example(rng, cfg.khop_entities, cfg.khop_facts, hops)
    elif graph_task:
        hops = split_value or int(rng.integers(1, cfg.khop_train_max_hops + 1))
        seen_length = 2 <= hops <= cfg.khop_train_max_hops and cfg.khop_heldout > 0
        heldout = (False if stream == tasks.TRAIN_STREAM else True if seen_length else None)
        shift = cfg.khop_train_shift if stream == tasks.TRAIN_STREAM else 0
        tokens, answer_start, reached = tasks.graph_example(
            rng, _graph(cfg), hops, heldout, cfg.khop_heldout, cfg.khop_query_slots, shift)
        if stream == tasks.TRAIN_STREAM and cfg.khop_supervision == "every_hop":
            return _hop_supervised_row(cfg.seq_len, tokens, answer_start, reached)
    else:
        digits = ((split_value, split_value) if split_value else
                  rng.integers(1, cfg.addition_train_max_digits + 1, size=2))
        tokens, answer_start = tasks.addition_example(rng, int(digits[0]), int(digits[1]),
                                                      cfg.addition_reverse_answer)
    return _padded_row(cfg.seq_len, tokens, answer_start)


def _hop_supervised_row(seq_len: int, tokens: np.ndarray, answer_start: int,
                        reached: np.ndarray) -> Batch:
    """A knowledge-graph row scored on the answer and, at relation i's position (i), on the
    entity reached after i hops (the last of which is the answer)."""
    row = _padded_row(seq_len, tokens, answer_start)
    hops = np.arange(1, len(reached))
    row["targets"] = row["targets"].copy()
    row["targets"][hops] = reached[:-1]
    row["loss_mask"][hops] = 1.0
    return row


def _padded_row(seq_len: int, tokens: np.ndarray, answer_start: int) -> Batch:
    """One task example padded to ``seq_len + 1`` tokens, scored on ``tokens[answer_start:]``."""
    window = np.full(seq_len + 1, BYTES.pad_id, np.int32)
    window[:len(tokens)] = tokens
    positions = np.arange(seq_len)
    return _row(window, (positions >= answer_start - 1) & (positions < len(tokens) - 1))


def _graph(cfg: DataConfig) -> np.ndarray:
    return _knowledge_graph(cfg.graph_seed, cfg.khop_entities, cfg.khop_relations)


_knowledge_graph = functools.lru_cache(maxsize=8)(tasks.knowledge_graph)


# ---------------------------------------------------------------------------- corpora
def lm_streams(cfg: DataConfig) -> tuple[corpus.PackedStream, corpus.PackedStream]:
    """(train, held-out) packed streams of an LM source."""
    store = _store(cfg.source, cfg.paths, cfg.jsonl_field, cfg.tokenizer)
    vocab = get_vocab(cfg)
    train, held = corpus.split_documents(store, cfg.eval_fraction, cfg.seed)
    return tuple(corpus.PackedStream(view, cfg.seq_len, vocab.eos_id, vocab.pad_id)
                 for view in (train, held))


@functools.lru_cache(maxsize=4)
def _store(source: str, paths: tuple[str, ...], jsonl_field: str | None, tokenizer: str):
    """The documents of an LM source, built once per process (tokenising may take a while)."""
    if source == "stdlib":
        return corpus.FileStore(corpus.stdlib_files())
    if source == "arrayrecord":
        return corpus.ArrayRecordStore(corpus.expand_paths(paths, directories=True))
    files = corpus.expand_paths(paths)
    if source == "text" and tokenizer == "bytes":
        return corpus.FileStore(files)
    docs = corpus.iter_documents(files, jsonl_field)
    return corpus.ArrayStore(load_vocab(tokenizer).encode_batch(list(docs)))


def _local_batch_size(cfg: DataConfig, process_index: int, process_count: int) -> int:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count="
                         f"{process_count})")
    if cfg.batch_size % process_count:
        raise ValueError(f"DataConfig.batch_size={cfg.batch_size} must be divisible by the "
                         f"process count {process_count}")
    return cfg.batch_size // process_count
