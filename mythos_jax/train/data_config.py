"""``TrainConfig.data``: where batches come from, one section class per ``source``.

    data: {source: stdlib, seq_len: 128, batch_size: 16}
    data: {source: jsonl, paths: [corpus/*.jsonl], jsonl_field: body, tokenizer: tok.json}
    data: {source: khop_graph, khop_entities: 32, khop_relations: 4, khop_eval_hops: [2, 8]}

Every source: ``seq_len`` tokens per row (>= 2); ``batch_size`` GLOBAL rows per step, over all
processes; ``seed`` (shuffle order, held-out choice and task examples, 0 <= seed < 2**32);
``eval_examples`` rows per eval split (rounded up to whole global batches); ``prefetch``
batches prepared ahead in a background thread (0 = synchronous). The sources and their own
fields are the classes below; ``mythos_jax.train.data`` reads them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

from mythos_jax.train import tasks
from mythos_jax.train.config_parse import Choice

KHOP_SUPERVISION = ("answer", "every_hop")


@dataclasses.dataclass(frozen=True)
class DataConfig(Choice):
    """The fields of every source (see the module docstring)."""
    key = "source"
    noun = "source"
    default = "stdlib"

    seq_len: int = 128
    batch_size: int = 16
    seed: int = 0
    eval_examples: int = 256
    prefetch: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, (str, list)) and isinstance(field.default, tuple):
                object.__setattr__(self, field.name,
                                   (value,) if isinstance(value, str) else tuple(value))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that breaks a rule."""
        self._check()
        longest = self.longest_example()
        if longest > self.seq_len + 1:
            _fail("seq_len", f"the longest {self.source} example has {longest} tokens; "
                             f"seq_len must be >= {longest - 1}, got {self.seq_len}")

    def _check(self) -> None:
        _require_int(self, "seq_len", 2)
        _require_int(self, "batch_size", 1)
        _require_int(self, "seed", 0, 2**32 - 1)
        _require_int(self, "eval_examples", 1)
        _require_int(self, "prefetch", 0)

    def longest_example(self) -> int:
        """Tokens in the longest example (0: language-model windows)."""
        return 0


@dataclasses.dataclass(frozen=True)
class LMData(DataConfig):
    """A language-model corpus, packed as ``doc EOS doc EOS ...`` into windows;
    ``eval_fraction``: the share of documents held out as split "heldout" (0: none)."""
    paths: ClassVar[tuple[str, ...]] = ()
    tokenizer: ClassVar[str] = "bytes"
    jsonl_field: ClassVar[str | None] = None
    eval_fraction: float = 0.05

    def _check(self) -> None:
        super()._check()
        if isinstance(self.eval_fraction, bool) or not isinstance(self.eval_fraction,
                                                                  (int, float)):
            _fail("eval_fraction", f"must be a number, got {self.eval_fraction!r}")
        if not 0 <= self.eval_fraction < 1:
            _fail("eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")


@dataclasses.dataclass(frozen=True)
class StdlibData(LMData):
    """Byte-level LM over the Python standard library's own ``.py`` files (no download; the
    corpus depends on the Python version that runs it)."""
    source = "stdlib"


@dataclasses.dataclass(frozen=True)
class TextData(LMData):
    """Files named by ``paths`` (globs allowed), one document per file. ``tokenizer``:
    "bytes" (ids 0-255, EOS 256, PAD 257; read lazily from disk) or a HuggingFace
    tokenizer.json path (tokenised into memory at start)."""
    source = "text"
    paths: tuple[str, ...] = ()
    tokenizer: str = "bytes"

    def _check(self) -> None:
        super()._check()
        _require_paths(self)
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            _fail("tokenizer", f"must be 'bytes' or a tokenizer.json path, got "
                               f"{self.tokenizer!r}")


@dataclasses.dataclass(frozen=True)
class JsonlData(TextData):
    """JSON lines, one document per line, text in ``jsonl_field`` (tokenised into memory at
    start; corpora that do not fit go through prepare-data and "arrayrecord")."""
    source = "jsonl"
    jsonl_field: str = "text"

    def _check(self) -> None:
        super()._check()
        if not isinstance(self.jsonl_field, str) or not self.jsonl_field:
            _fail("jsonl_field", f"must be a non-empty string, got {self.jsonl_field!r}")


@dataclasses.dataclass(frozen=True)
class ArrayRecordData(LMData):
    """Directories (or globs) written by ``mythos-jax prepare-data``, with the tokenizer
    recorded in their metadata."""
    source = "arrayrecord"
    paths: tuple[str, ...] = ()

    def _check(self) -> None:
        super()._check()
        _require_paths(self)


@dataclasses.dataclass(frozen=True)
class HopsData(DataConfig):
    """A k-hop task (byte-level tokens, scored on the answer): ``khop_entities`` entities,
    train hops uniform in [1, ``khop_train_max_hops``], eval splits "hops=k" for k in
    ``khop_eval_hops``."""
    khop_entities: int = 64
    khop_train_max_hops: int = 4
    khop_eval_hops: tuple[int, ...] = (2, 4, 6, 8)

    def _check(self) -> None:
        super()._check()
        _require_int(self, "khop_entities", 2, tasks.MAX_ENTITIES)
        _require_int(self, "khop_train_max_hops", 1)
        _require_ints(self, "khop_eval_hops", 1)


@dataclasses.dataclass(frozen=True)
class KhopData(HopsData):
    """k-hop over ``khop_facts`` facts per prompt (one cycle; more than any hop count)."""
    source = "khop"
    khop_facts: int = 16

    def _check(self) -> None:
        super()._check()
        _require_int(self, "khop_facts", 2, self.khop_entities)
        most = max(self.khop_train_max_hops, *self.khop_eval_hops)
        if self.khop_facts <= most:
            _fail("khop_facts", f"must exceed every hop count ({most}), got {self.khop_facts}")

    def longest_example(self) -> int:
        return max(tasks.khop_length(self.khop_facts, k)
                   for k in (self.khop_train_max_hops, *self.khop_eval_hops))


@dataclasses.dataclass(frozen=True)
class KhopGraphData(HopsData):
    """k-hop over a knowledge graph of ``khop_relations`` relations (permutations fixed by
    ``seed``); a ``khop_heldout`` share of the multi-hop tuples never appears in training and
    is what splits "hops=k" with k <= khop_train_max_hops evaluate (longer splits: any tuple,
    no training example has that many hops; training never draws a tuple with a held-out
    prefix). ``khop_supervision``: "answer" scores training rows on the answer only;
    "every_hop" also scores relation i's position on the entity reached after i hops (never an
    input token: the hops stay implicit). Eval rows are always scored on the answer only.
    ``khop_query_slots`` > 0: every query has that many relation slots, the unused ones an
    identity relation at random positions (hop count no longer tied to query length).
    ``khop_train_shift`` > 0: every training query starts its relations after 0..shift
    identity relations (uniform), so training puts relations at positions up to shift +
    ``khop_train_max_hops``; eval queries are not shifted.
    ``khop_graph_seed``: the graph and the eval queries (None: ``seed``), so that runs of
    several seeds can share one graph and eval set and differ in init and data order only."""
    source = "khop_graph"
    khop_relations: int = 4
    khop_heldout: float = 0.1
    khop_supervision: str = "answer"
    khop_query_slots: int = 0
    khop_train_shift: int = 0
    khop_graph_seed: int | None = None

    def _check(self) -> None:
        super()._check()
        _require_int(self, "khop_relations", 1, tasks.MAX_RELATIONS)
        _require_int(self, "khop_query_slots", 0)
        most = max(self.khop_train_max_hops, *self.khop_eval_hops)
        if 0 < self.khop_query_slots < most:
            _fail("khop_query_slots", f"must be 0 or >= every hop count ({most}), got "
                                      f"{self.khop_query_slots}")
        _require_int(self, "khop_train_shift", 0)
        if self.khop_train_shift and self.khop_query_slots:
            _fail("khop_train_shift", "cannot shift queries spread over khop_query_slots: set "
                                      "one of the two")
        if self.khop_graph_seed is not None:
            _require_int(self, "khop_graph_seed", 0, 2**32 - 1)
        if self.khop_supervision not in KHOP_SUPERVISION:
            _fail("khop_supervision", f"must be one of {KHOP_SUPERVISION}, got "
                                      f"{self.khop_supervision!r}")
        if isinstance(self.khop_heldout, bool) or not isinstance(self.khop_heldout, (int, float)):
            _fail("khop_heldout", f"must be a number, got {self.khop_heldout!r}")
        if not 0 <= self.khop_heldout < 1:
            _fail("khop_heldout", f"must be in [0, 1), got {self.khop_heldout}")

    def longest_example(self) -> int:
        return tasks.graph_length(max(self.khop_query_slots, *self.khop_eval_hops,
                                      self.khop_train_shift + self.khop_train_max_hops))

    @property
    def graph_seed(self) -> int:
        """The seed of the knowledge graph and of the eval queries."""
        return self.seed if self.khop_graph_seed is None else self.khop_graph_seed


@dataclasses.dataclass(frozen=True)
class AdditionData(DataConfig):
    """Addition: train operands of 1..``addition_train_max_digits`` digits each (uniform),
    eval splits "digits=d" (both operands d digits) for d in ``addition_eval_digits``;
    ``addition_reverse_answer``: answer digits least significant first."""
    source = "addition"
    addition_train_max_digits: int = 8
    addition_eval_digits: tuple[int, ...] = (4, 8, 12)
    addition_reverse_answer: bool = True

    def _check(self) -> None:
        super()._check()
        _require_int(self, "addition_train_max_digits", 1)
        _require_ints(self, "addition_eval_digits", 1)
        if not isinstance(self.addition_reverse_answer, bool):
            _fail("addition_reverse_answer", f"must be a bool, got "
                                             f"{self.addition_reverse_answer!r}")

    def longest_example(self) -> int:
        return tasks.addition_length(max(self.addition_train_max_digits,
                                         *self.addition_eval_digits))


SOURCES = tuple(DataConfig.kinds)
LM_SOURCES = tuple(name for name, cls in DataConfig.kinds.items() if issubclass(cls, LMData))
TASK_SOURCES = tuple(name for name in SOURCES if name not in LM_SOURCES)


def _fail(field: str, rule: str) -> None:
    raise ValueError(f"DataConfig.{field}: {rule}")


def _require_paths(cfg: LMData) -> None:
    if not cfg.paths:
        _fail("paths", f"source={cfg.source!r} needs at least one file, glob or directory")
    if not all(isinstance(p, str) and p for p in cfg.paths):
        _fail("paths", f"must be non-empty strings, got {cfg.paths!r}")


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
