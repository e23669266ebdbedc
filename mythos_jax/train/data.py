"""Training and evaluation data through Grain: packed language-model windows or synthetic tasks.

Sources (``DataConfig.source``):
  "stdlib"       byte-level LM over the Python standard library's own ``.py`` files (no download;
                 the corpus depends on the Python version that runs it)
  "text"         files named by ``paths`` (globs allowed), one document per file (byte-level:
                 read lazily from disk)
  "jsonl"        JSON lines, one document per line, text in ``jsonl_field``
                 (text with a tokenizer.json, and jsonl, are tokenised into memory at start;
                 corpora that do not fit go through prepare-data and "arrayrecord")
  "arrayrecord"  directories written by ``mythos-jax prepare-data``, with the tokenizer
                 recorded in their metadata
  "khop", "khop_graph", "addition"   synthetic tasks of ``tasks.py``, byte-level tokens, scored
                 on the answer

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
share a generator with training examples (``eval_fraction`` is for LM sources only). Eval sets are rounded up to whole global batches;
rows past the data (LM only) are all PAD with a zero mask.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import grain
import numpy as np

from mythos_jax.train import corpus, tasks
from mythos_jax.train.tokenizer import BYTES, Vocab, load_vocab

LM_SOURCES = ("stdlib", "text", "jsonl", "arrayrecord")
TASK_SOURCES = ("khop", "khop_graph", "addition")
SOURCES = LM_SOURCES + TASK_SOURCES
KHOP_SUPERVISION = ("answer", "every_hop")
TASK_STREAM_LENGTH = 2**62      # "infinite" train stream of task examples
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where batches come from and how they are cut.

    ``source``: one of ``SOURCES`` (see the module docstring). ``paths``: files or globs for
    "text"/"jsonl", prepare-data directories (or globs) for "arrayrecord"; empty otherwise.
    ``jsonl_field``: the text field of each JSON line. ``tokenizer``: "bytes" (ids 0-255, EOS
    256, PAD 257) or a HuggingFace tokenizer.json path (text/jsonl only).
    ``seq_len``: tokens per row (>= 2). ``batch_size``: GLOBAL rows per step, over all
    processes. ``seed``: shuffle order, held-out choice and task examples (0 <= seed < 2**32).
    ``eval_fraction``: share of LM documents held out (0 = no "heldout" split).
    ``eval_examples``: rows per eval split (rounded up to whole global batches).
    ``prefetch``: batches prepared ahead in a background thread (0 = synchronous).
    k-hop: ``khop_entities`` (<= 128) entities, ``khop_facts`` facts per prompt (one cycle; more
    than any hop count), train hops uniform in [1, ``khop_train_max_hops``], eval splits
    "hops=k" for k in ``khop_eval_hops``.
    k-hop over a knowledge graph ("khop_graph"): ``khop_entities`` entities, ``khop_relations``
    relations (permutations fixed by ``seed``), train hops uniform in [1,
    ``khop_train_max_hops``]; a ``khop_heldout`` share of the multi-hop tuples never appears in
    training and is what splits "hops=k" with k <= khop_train_max_hops evaluate (longer splits:
    any tuple, no training example has that many hops). ``khop_supervision``: "answer" scores
    training rows on the answer only; "every_hop" also scores relation i's position on the
    entity reached after i hops (never an input token: the hops stay implicit). Eval rows are
    always scored on the answer only.
    Addition: train operands of 1..``addition_train_max_digits`` digits each (uniform), eval
    splits "digits=d" (both operands d digits) for d in ``addition_eval_digits``;
    ``addition_reverse_answer``: answer digits least significant first.
    """

    source: str = "stdlib"
    paths: tuple[str, ...] = ()
    jsonl_field: str = "text"
    tokenizer: str = "bytes"
    seq_len: int = 128
    batch_size: int = 16
    seed: int = 0
    eval_fraction: float = 0.05
    eval_examples: int = 256
    prefetch: int = 2
    khop_entities: int = 64
    khop_facts: int = 16
    khop_train_max_hops: int = 4
    khop_eval_hops: tuple[int, ...] = (2, 4, 6, 8)
    khop_relations: int = 4
    khop_heldout: float = 0.1
    khop_supervision: str = "answer"
    addition_train_max_digits: int = 8
    addition_eval_digits: tuple[int, ...] = (4, 8, 12)
    addition_reverse_answer: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.paths, str):
            object.__setattr__(self, "paths", (self.paths,))
        for name in ("paths", "khop_eval_hops", "addition_eval_digits"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that breaks a rule."""
        if self.source not in SOURCES:
            _fail("source", f"must be one of {SOURCES}, got {self.source!r}")
        needs_paths = self.source in ("text", "jsonl", "arrayrecord")
        if needs_paths and not self.paths:
            _fail("paths", f"source={self.source!r} needs at least one file, glob or directory")
        if not needs_paths and self.paths:
            _fail("paths", f"source={self.source!r} reads no files, got {self.paths!r}")
        if not all(isinstance(p, str) and p for p in self.paths):
            _fail("paths", f"must be non-empty strings, got {self.paths!r}")
        if not isinstance(self.jsonl_field, str) or not self.jsonl_field:
            _fail("jsonl_field", f"must be a non-empty string, got {self.jsonl_field!r}")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            _fail("tokenizer", f"must be 'bytes' or a tokenizer.json path, got "
                               f"{self.tokenizer!r}")
        if self.tokenizer != "bytes" and self.source not in ("text", "jsonl"):
            _fail("tokenizer", f"source={self.source!r} sets its own tokenizer (tasks: bytes; "
                               "arrayrecord: the one prepare-data used); leave it 'bytes', got "
                               f"{self.tokenizer!r}")
        _require_int(self, "seq_len", 2)
        _require_int(self, "batch_size", 1)
        _require_int(self, "seed", 0, 2**32 - 1)
        _require_int(self, "eval_examples", 1)
        _require_int(self, "prefetch", 0)
        if isinstance(self.eval_fraction, bool) or not isinstance(self.eval_fraction,
                                                                  (int, float)):
            _fail("eval_fraction", f"must be a number, got {self.eval_fraction!r}")
        if not 0 <= self.eval_fraction < 1:
            _fail("eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        _require_int(self, "khop_entities", 2, tasks.MAX_ENTITIES)
        _require_int(self, "khop_train_max_hops", 1)
        _require_int(self, "khop_facts", 2, self.khop_entities if self.source == "khop" else None)
        _require_ints(self, "khop_eval_hops", 1)
        _require_int(self, "khop_relations", 1, tasks.MAX_RELATIONS)
        if self.khop_supervision not in KHOP_SUPERVISION:
            _fail("khop_supervision", f"must be one of {KHOP_SUPERVISION}, got "
                                      f"{self.khop_supervision!r}")
        if isinstance(self.khop_heldout, bool) or not isinstance(self.khop_heldout, (int, float)):
            _fail("khop_heldout", f"must be a number, got {self.khop_heldout!r}")
        if not 0 <= self.khop_heldout < 1:
            _fail("khop_heldout", f"must be in [0, 1), got {self.khop_heldout}")
        _require_int(self, "addition_train_max_digits", 1)
        _require_ints(self, "addition_eval_digits", 1)
        if not isinstance(self.addition_reverse_answer, bool):
            _fail("addition_reverse_answer", f"must be a bool, got "
                                             f"{self.addition_reverse_answer!r}")
        if self.source == "khop":
            most = max(self.khop_train_max_hops, *self.khop_eval_hops)
            if self.khop_facts <= most:
                _fail("khop_facts", f"must exceed every hop count ({most}), got "
                                    f"{self.khop_facts}")
            longest = max(tasks.khop_length(self.khop_facts, k)
                          for k in (self.khop_train_max_hops, *self.khop_eval_hops))
        elif self.source == "khop_graph":
            longest = tasks.graph_length(max(self.khop_train_max_hops, *self.khop_eval_hops))
        elif self.source == "addition":
            longest = tasks.addition_length(max(self.addition_train_max_digits,
                                                *self.addition_eval_digits))
        else:
            longest = 0
        if longest > self.seq_len + 1:
            _fail("seq_len", f"the longest {self.source} example has {longest} tokens; "
                             f"seq_len must be >= {longest - 1}, got {self.seq_len}")


# ---------------------------------------------------------------------------- public API
def get_vocab(cfg: DataConfig) -> Vocab:
    """The vocabulary of ``cfg``'s tokens (sizes and special ids)."""
    if cfg.source == "arrayrecord":
        meta = corpus.read_arrayrecord_metadata(
            corpus.expand_paths(cfg.paths, directories=True)[0])
        return Vocab(meta["tokenizer"], meta["vocab_size"], meta["eos_id"], meta["pad_id"])
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
    rng = tasks.example_rng(cfg.seed, stream, index, split_value)
    if cfg.source == "khop":
        hops = split_value or int(rng.integers(1, cfg.khop_train_max_hops + 1))
        tokens, answer_start = tasks.khop_example(rng, cfg.khop_entities, cfg.khop_facts, hops)
    elif cfg.source == "khop_graph":
        hops = split_value or int(rng.integers(1, cfg.khop_train_max_hops + 1))
        seen_length = 2 <= hops <= cfg.khop_train_max_hops and cfg.khop_heldout > 0
        heldout = (False if stream == tasks.TRAIN_STREAM else True if seen_length else None)
        tokens, answer_start, reached = tasks.graph_example(rng, _graph(cfg), hops, heldout,
                                                            cfg.khop_heldout)
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
    return _knowledge_graph(cfg.seed, cfg.khop_entities, cfg.khop_relations)


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
def _store(source: str, paths: tuple[str, ...], jsonl_field: str, tokenizer: str):
    """The documents of an LM source, built once per process (tokenising may take a while)."""
    if source == "stdlib":
        return corpus.FileStore(corpus.stdlib_files())
    if source == "arrayrecord":
        return corpus.ArrayRecordStore(corpus.expand_paths(paths, directories=True))
    files = corpus.expand_paths(paths)
    if source == "text" and tokenizer == "bytes":
        return corpus.FileStore(files)
    docs = corpus.iter_documents(files, jsonl_field if source == "jsonl" else None)
    return corpus.ArrayStore(load_vocab(tokenizer).encode_batch(list(docs)))


def _local_batch_size(cfg: DataConfig, process_index: int, process_count: int) -> int:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count="
                         f"{process_count})")
    if cfg.batch_size % process_count:
        raise ValueError(f"DataConfig.batch_size={cfg.batch_size} must be divisible by the "
                         f"process count {process_count}")
    return cfg.batch_size // process_count


def _fail(field: str, rule: str) -> None:
    raise ValueError(f"DataConfig.{field}: {rule}")


def _require_int(cfg: DataConfig, name: str, minimum: int, maximum: int | None = None) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, f"must be an int, got {type(value).__name__} {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        _fail(name, f"must be {bound}, got {value}")


def _require_ints(cfg: DataConfig, name: str, minimum: int) -> None:
    values: Sequence[Any] = getattr(cfg, name)
    if not isinstance(values, tuple) or not values or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in values):
        _fail(name, f"must be a non-empty tuple of ints >= {minimum}, got {values!r}")
