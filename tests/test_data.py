"""mythos_jax.train.data: batch format, packing, tasks, sharding, exact resume, bad input."""

import json
import sys

import numpy as np
import pytest

from mythos_jax.train import corpus, data, tasks
from mythos_jax.train.config import load_train_config
from mythos_jax.train.data_config import (AdditionData, DataConfig, JsonlData, KhopData,
                                         KhopGraphData, StdlibData, TextData)
from mythos_jax.train.tokenizer import BYTE_EOS, BYTE_PAD, load_vocab

DOCS = [b"alpha beta\n", b"", b"gamma\n" * 7, b"delta", b"epsilon zeta eta\n" * 3]


@pytest.fixture
def text_files(tmp_path):
    paths = []
    for i, doc in enumerate(DOCS):
        paths.append(tmp_path / f"doc{i}.txt")
        paths[-1].write_bytes(doc)
    return [str(p) for p in paths]


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# ---------------------------------------------------------------------------- LM sources
def test_stdlib_batch_format_and_first_batch_fast():
    cfg = StdlibData(seq_len=64, batch_size=8)
    batch = next(data.train_iterator(cfg))
    assert batch["inputs"].shape == batch["targets"].shape == batch["loss_mask"].shape == (8, 64)
    assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
    assert batch["loss_mask"].dtype == np.float32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert batch["inputs"].max() < data.vocab_size(cfg) == 258
    assert data.eval_splits(cfg) == ("heldout",)
    assert "windows of 64" in data.describe(cfg)
    train, held = data.lm_streams(cfg)
    train_files = {train.docs.store.paths[i] for i in train.docs.doc_ids}
    held_files = {held.docs.store.paths[i] for i in held.docs.doc_ids}
    assert held_files and not train_files & held_files
    assert all(p.endswith(".py") and "site-packages" not in p for p in train_files)


def test_packing_eos_between_documents_and_padding(text_files):
    cfg = TextData(paths=tuple(text_files), seq_len=10, batch_size=1,
                   eval_fraction=0.0, prefetch=0)
    stream = data.lm_streams(cfg)[0]
    expected = np.concatenate([np.append(np.frombuffer(d, np.uint8), BYTE_EOS)
                               for d in DOCS if d])
    windows = [stream.window(i) for i in range(stream.num_windows)]
    rebuilt = np.concatenate([w[:filled][:-1] for w, filled in windows[:-1]]
                             + [windows[-1][0][:windows[-1][1]]])
    np.testing.assert_array_equal(rebuilt, expected)
    last, filled = windows[-1]
    assert filled < 11 and (last[filled:] == BYTE_PAD).all()
    # One epoch through the iterator: every window once (shuffled), masked only on padding.
    epoch = take(data.train_iterator(cfg), stream.num_windows)
    rows = sorted(tuple(b["inputs"][0]) for b in epoch)
    assert rows == sorted(tuple(w[:-1]) for w, _ in windows)
    padded = [b for b in epoch if (b["targets"][0] == BYTE_PAD).any()]
    assert len(padded) == 1
    np.testing.assert_array_equal(padded[0]["loss_mask"][0], padded[0]["targets"][0] != BYTE_PAD)


def test_epochs_are_reshuffled_and_seeded(text_files):
    cfg = TextData(paths=tuple(text_files), seq_len=8, batch_size=1,
                   eval_fraction=0.0)
    n = data.lm_streams(cfg)[0].num_windows
    order = [tuple(b["inputs"][0]) for b in take(data.train_iterator(cfg), 2 * n)]
    assert sorted(order[:n]) == sorted(order[n:]) and order[:n] != order[n:]
    other = [tuple(b["inputs"][0]) for b in take(data.train_iterator(
        TextData(paths=tuple(text_files), seq_len=8, batch_size=1,
                 eval_fraction=0.0, seed=1)), n)]
    assert other != order[:n]


def test_single_document_holds_out_its_tail(tmp_path):
    path = tmp_path / "one.txt"
    path.write_bytes(bytes(range(32, 127)) * 3)
    cfg = TextData(paths=(str(path),), seq_len=16, batch_size=4,
                   eval_fraction=0.2, eval_examples=8)
    train, held = data.lm_streams(cfg)
    assert train.num_tokens + held.num_tokens == 3 * 95 + 2
    assert held.num_tokens - 1 == round(0.2 * 3 * 95)
    batches = data.eval_batches(cfg, "heldout")
    assert len(batches) == 2 and sum(b["loss_mask"].sum() for b in batches) > 0


def test_eval_batches_rounded_to_global_batches_and_padded():
    cfg = StdlibData(seq_len=32, batch_size=6, eval_examples=10)
    batches = data.eval_batches(cfg, "heldout")
    assert len(batches) == 2 and all(b["inputs"].shape == (6, 32) for b in batches)
    assert_same_batches(batches, data.eval_batches(cfg, "heldout"))
    with pytest.raises(ValueError, match="eval split 'hops=2'"):
        data.eval_batches(cfg, "hops=2")


# ---------------------------------------------------------------------------- tasks
def solve_khop(tokens):
    """The answer of a k-hop prompt (tokens up to and including '='), by following links."""
    text = tokens.tolist()
    query = text.index(ord("?"))
    succ = {a: b for a, b, _ in np.reshape(text[:query], (-1, 3))}
    start, hops = text[query + 1], text[query + 2:].count(ord(">"))
    assert text[query + 2 + hops:] == [ord("=")]
    for _ in range(hops):
        start = succ[start]
    return start, hops


def answer_rows(batch):
    """(prompt tokens, answer tokens) of every row of a task batch."""
    for inputs, targets, mask in zip(batch["inputs"], batch["targets"], batch["loss_mask"]):
        first = int(np.flatnonzero(mask)[0])
        yield inputs[:first + 1], targets[mask > 0]


def test_khop_answers_follow_the_listed_facts():
    cfg = KhopData(seq_len=64, batch_size=16, khop_entities=20,
                   khop_facts=10, khop_eval_hops=(3, 9))
    train_hops = []
    for prompt, answer in answer_rows(next(data.train_iterator(cfg))):
        expected, hops = solve_khop(prompt)
        train_hops.append(hops)
        assert answer.tolist() == [expected, BYTE_EOS]
        assert prompt.min() >= 0 and tasks.ENTITY_BASE <= expected < tasks.ENTITY_BASE + 20
    assert set(train_hops) <= {1, 2, 3, 4} and len(set(train_hops)) > 1
    assert data.eval_splits(cfg) == ("hops=3", "hops=9")
    for prompt, answer in answer_rows(data.eval_batches(cfg, "hops=9")[0]):
        expected, hops = solve_khop(prompt)
        assert hops == 9 and answer.tolist() == [expected, BYTE_EOS]


def graph_config(**overrides) -> KhopGraphData:
    fields = dict(seq_len=16, batch_size=64, khop_entities=12,
                  khop_relations=3, khop_train_max_hops=3, khop_eval_hops=(1, 2, 3, 7),
                  khop_heldout=0.25)
    return KhopGraphData(**{**fields, **overrides})


def compose(graph: np.ndarray, query: np.ndarray) -> list[int]:
    """The entity tokens reached after each relation slot of ``query`` (entity, relations...;
    an identity slot keeps the entity)."""
    entity, reached = int(query[0]) - tasks.ENTITY_BASE, []
    for relation in query[1:]:
        if relation != tasks.IDENTITY_RELATION:
            entity = int(graph[int(relation) - tasks.RELATION_BASE, entity])
        reached.append(tasks.ENTITY_BASE + entity)
    return reached


def real_tuple(query: np.ndarray) -> tuple[int, ...]:
    """(start entity, relation ids) of a query, identity slots left out."""
    relations = [int(r) - tasks.RELATION_BASE for r in query[1:] if r != tasks.IDENTITY_RELATION]
    return (int(query[0]) - tasks.ENTITY_BASE, *relations)


def is_heldout_query(prompt: np.ndarray, fraction: float) -> bool:
    return tasks.is_heldout(int(prompt[0]) - tasks.ENTITY_BASE,
                            prompt[1:] - tasks.RELATION_BASE, fraction)


def test_knowledge_graph_relations_are_seeded_permutations():
    graph = tasks.knowledge_graph(3, 12, 4)
    assert graph.shape == (4, 12)
    assert all(sorted(row) == list(range(12)) for row in graph)
    np.testing.assert_array_equal(graph, tasks.knowledge_graph(3, 12, 4))
    assert not np.array_equal(graph, tasks.knowledge_graph(4, 12, 4))


def test_graph_answers_compose_the_relations_and_heldout_tuples_never_train():
    cfg = graph_config()
    graph = tasks.knowledge_graph(cfg.seed, 12, 3)
    seen_hops = set()
    for batch in take(data.train_iterator(cfg), 3):
        for prompt, answer in answer_rows(batch):
            hops = len(prompt) - 1
            seen_hops.add(hops)
            assert answer.tolist() == [compose(graph, prompt)[-1]]     # no EOS is scored
            assert not is_heldout_query(prompt, 0.25)
    assert seen_hops == {1, 2, 3}
    for split, heldout in (("hops=2", True), ("hops=3", True), ("hops=7", None)):
        for prompt, answer in answer_rows(data.eval_batches(cfg, split)[0]):
            assert len(prompt) - 1 == int(split.split("=")[1])
            assert answer.tolist() == [compose(graph, prompt)[-1]]
            if heldout:
                assert is_heldout_query(prompt, 0.25)


def test_every_hop_supervision_scores_each_relation_on_the_entity_reached():
    cfg = graph_config(khop_supervision="every_hop")
    graph = tasks.knowledge_graph(cfg.seed, 12, 3)
    batch = next(data.train_iterator(cfg))
    for inputs, targets, mask in zip(batch["inputs"], batch["targets"], batch["loss_mask"]):
        hops = int(np.sum(mask))
        query = inputs[:hops + 1]
        assert np.flatnonzero(mask).tolist() == list(range(1, hops + 1))
        assert targets[1:hops + 1].tolist() == compose(graph, query)
        assert all(tasks.ENTITY_BASE <= t < tasks.ENTITY_BASE + 12 for t in targets[1:hops + 1])
    evaluation = data.eval_batches(cfg, "hops=3")[0]                 # eval: the answer only
    assert np.all(evaluation["loss_mask"].sum(axis=1) == 1)


@pytest.mark.parametrize("slots, shift", [(0, 0), (9, 0), (0, 5)],
                         ids=["plain", "slots", "shift"])
def test_no_heldout_query_is_ever_a_supervised_position_in_training(slots, shift):
    """Every supervised position of 300 training batches (every-hop supervision: each relation
    slot is scored on the entity reached so far) asks a tuple that is not held out; the
    in-distribution eval queries are all held out, so none of them was ever scored."""
    cfg = graph_config(khop_supervision="every_hop", khop_query_slots=slots,
                       khop_train_shift=shift, khop_train_max_hops=4,
                       khop_eval_hops=(2, 3, 4, 9), khop_heldout=0.3)
    graph = tasks.knowledge_graph(cfg.graph_seed, 12, 3)
    supervised = set()
    for batch in take(data.train_iterator(cfg), 300):
        for inputs, targets, mask in zip(batch["inputs"], batch["targets"], batch["loss_mask"]):
            scored = np.flatnonzero(mask)
            assert scored.tolist() == list(range(1, len(scored) + 1))
            query = inputs[:len(scored) + 1]
            assert targets[scored].tolist() == compose(graph, query)
            for position in scored:             # the question asked at this position
                supervised.add(real_tuple(query[:position + 1]))
    assert not any(tasks.is_heldout(t[0], np.array(t[1:]), 0.3) for t in supervised)
    assert max(len(t) for t in supervised) == 5
    for hops in (2, 3, 4):
        asked = set()
        for prompt, answer in answer_rows(data.eval_batches(cfg, f"hops={hops}")[0]):
            assert len(prompt) - 1 == (slots or hops)
            assert answer.tolist() == [compose(graph, prompt)[-1]]
            asked.add(real_tuple(prompt))
        assert all(len(t) == hops + 1 and tasks.is_heldout(t[0], np.array(t[1:]), 0.3)
                   for t in asked)
        assert not asked & supervised


def test_query_slots_spread_the_relations_over_every_position():
    """With 9 slots, training queries of 1..4 hops put real relations at every slot position
    (the hop count is not the query length) and the answer always sits after slot 9."""
    cfg = graph_config(khop_query_slots=9, khop_train_max_hops=4, khop_eval_hops=(2, 9))
    positions, hops = set(), set()
    for batch in take(data.train_iterator(cfg), 4):
        for prompt, _ in answer_rows(batch):
            assert len(prompt) == 10
            real = np.flatnonzero(prompt[1:] != tasks.IDENTITY_RELATION) + 1
            positions.update(real.tolist())
            hops.add(len(real))
    assert positions == set(range(1, 10)) and hops == {1, 2, 3, 4}
    with pytest.raises(ValueError, match="DataConfig.khop_query_slots: must be 0 or >= every"):
        graph_config(khop_query_slots=5, khop_eval_hops=(2, 9))


def test_train_shift_moves_the_same_training_queries_past_the_trained_hops():
    """With a shift of 5, training queries of 1..3 hops are the unshifted run's queries (same
    seed) with 0..5 identity relations before their relations, which stay together; relations
    then sit at every position 1..8; eval batches are the unshifted run's, bit for bit."""
    plain, shifted = graph_config(), graph_config(khop_train_shift=5)
    positions, leads = set(), set()
    for ours, theirs in zip(take(data.train_iterator(shifted), 6),
                            take(data.train_iterator(plain), 6)):
        for (prompt, answer), (reference, expected) in zip(answer_rows(ours),
                                                           answer_rows(theirs)):
            real = np.flatnonzero(prompt[1:] != tasks.IDENTITY_RELATION) + 1
            assert real.tolist() == list(range(real[0], real[-1] + 1))
            assert prompt[0] == reference[0] and prompt[real].tolist() == reference[1:].tolist()
            assert answer.tolist() == expected.tolist()
            positions.update(real.tolist())
            leads.add(int(real[0]) - 1)
    assert positions == set(range(1, 9)) and leads == set(range(6))
    for split in ("hops=2", "hops=7"):
        ours, theirs = data.eval_batches(shifted, split), data.eval_batches(plain, split)
        assert all(np.array_equal(a[key], b[key]) for a, b in zip(ours, theirs) for key in a)
    with pytest.raises(ValueError, match="DataConfig.khop_train_shift: cannot shift queries"):
        graph_config(khop_train_shift=2, khop_query_slots=7)
    with pytest.raises(ValueError, match="DataConfig.seq_len"):
        graph_config(khop_train_shift=13)   # 13 + 3 hops + 2 > 16 + 1


def test_graph_seed_fixes_graph_and_eval_queries_while_seed_moves_training_order():
    one, two = (graph_config(seed=s, khop_graph_seed=7) for s in (1, 2))
    for split in ("hops=2", "hops=7"):
        np.testing.assert_array_equal(data.eval_batches(one, split)[0]["inputs"],
                                      data.eval_batches(two, split)[0]["inputs"])
    assert not np.array_equal(next(data.train_iterator(one))["inputs"],
                              next(data.train_iterator(two))["inputs"])
    assert one.graph_seed == 7 and graph_config(seed=3).graph_seed == 3


def test_heldout_split_is_a_stable_hash_of_the_tuple():
    relations = np.array([0, 2, 1])
    assert tasks.is_heldout(5, relations, 0.5) == tasks.is_heldout(5, relations.copy(), 0.5)
    assert not tasks.is_heldout(5, relations[:1], 0.99)            # atomic facts always train
    share = np.mean([tasks.is_heldout(e, np.array([r, q]), 0.3)
                     for e in range(30) for r in range(5) for q in range(5)])
    assert 0.2 < share < 0.4


def test_graph_config_errors():
    with pytest.raises(ValueError, match="DataConfig.khop_supervision"):
        graph_config(khop_supervision="all")
    with pytest.raises(ValueError, match=r"DataConfig.khop_heldout: must be in \[0, 1\)"):
        graph_config(khop_heldout=1.0)
    with pytest.raises(ValueError, match="DataConfig.khop_relations"):
        graph_config(khop_relations=0)
    with pytest.raises(ValueError, match="DataConfig.seq_len: the longest khop_graph example"):
        graph_config(seq_len=6)


@pytest.mark.parametrize("reverse", [True, False])
def test_addition_answers(reverse):
    cfg = AdditionData(seq_len=48, batch_size=16, addition_train_max_digits=3,
                       addition_eval_digits=(5,), addition_reverse_answer=reverse)
    for batch, digits in ((next(data.train_iterator(cfg)), {1, 2, 3}),
                          (data.eval_batches(cfg, "digits=5")[0], {5})):
        for prompt, answer in answer_rows(batch):
            a, b = bytes(prompt[:-1].tolist()).decode().split("+")
            assert {len(a), len(b)} <= digits
            assert answer[-1] == BYTE_EOS
            text = bytes(answer[:-1].tolist()).decode()
            assert int(text[::-1] if reverse else text) == int(a) + int(b)


def test_task_examples_are_deterministic_and_seeded():
    cfg = KhopData(seq_len=64, batch_size=4)
    assert_same_batches(take(data.train_iterator(cfg), 2), take(data.train_iterator(cfg), 2))
    other = next(data.train_iterator(KhopData(seq_len=64, batch_size=4,
                                              seed=5)))
    assert not np.array_equal(other["inputs"], next(data.train_iterator(cfg))["inputs"])


def test_answer_accuracy():
    cfg = AdditionData(seq_len=40, batch_size=4, addition_eval_digits=(4,))
    batch = data.eval_batches(cfg, "digits=4")[0]
    assert data.answer_accuracy(batch["targets"], batch) == (1.0, 1.0)
    pred = batch["targets"].copy()
    row, col = 1, int(np.flatnonzero(batch["loss_mask"][1])[0])
    pred[row, col] += 1
    pred[0, 0] += 1                       # outside the mask: does not count
    token_acc, exact = data.answer_accuracy(pred, batch)
    assert exact == 0.75
    assert token_acc == pytest.approx(1 - 1 / batch["loss_mask"].sum())


# ---------------------------------------------------------------------------- sharding, resume
@pytest.mark.parametrize("source", ["stdlib", "khop"])
def test_processes_split_the_global_batch(source):
    cfg = DataConfig.kinds[source](seq_len=64, batch_size=6)
    whole = take(data.train_iterator(cfg), 3)
    parts = [take(data.train_iterator(cfg, p, 3), 3) for p in range(3)]
    for step, batch in enumerate(whole):
        assert all(part[step]["inputs"].shape == (2, 64) for part in parts)
        for key in batch:
            np.testing.assert_array_equal(
                np.concatenate([part[step][key] for part in parts]), batch[key])
    # The state counts global batches, so it moves between process counts.
    single = data.train_iterator(cfg)
    take(single, 2)
    shard = data.train_iterator(cfg, 1, 3)
    shard.set_state(single.get_state())
    np.testing.assert_array_equal(next(shard)["inputs"], whole[2]["inputs"][2:4])
    split = data.eval_splits(cfg)[0]
    np.testing.assert_array_equal(
        np.concatenate([data.eval_batches(cfg, split, p, 3)[0]["inputs"] for p in range(3)]),
        data.eval_batches(cfg, split)[0]["inputs"])
    with pytest.raises(ValueError, match="batch_size=6 must be divisible by the process count 4"):
        data.train_iterator(cfg, 0, 4)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_state_resumes_exactly_across_epochs(text_files, prefetch):
    cfg = TextData(paths=tuple(text_files), seq_len=8, batch_size=2,
                   eval_fraction=0.0, prefetch=prefetch)
    n_windows = data.lm_streams(cfg)[0].num_windows
    steps_per_epoch = n_windows // cfg.batch_size
    iterator = data.train_iterator(cfg, 1, 2)
    take(iterator, steps_per_epoch - 1)
    state = json.loads(json.dumps(iterator.get_state()))
    continued = take(iterator, 4)                 # crosses the epoch boundary
    fresh = data.train_iterator(cfg, 1, 2)
    fresh.set_state(state)
    assert_same_batches(take(fresh, 4), continued)


def test_state_in_an_orbax_checkpoint(tmp_path):
    import grain
    import orbax.checkpoint as ocp

    cfg = AdditionData(seq_len=40, batch_size=4)
    iterator = data.train_iterator(cfg)
    take(iterator, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
        expected = take(iterator, 2)
        restored = data.train_iterator(cfg)
        manager.restore(3, args=ocp.args.Composite(
            ds=grain.checkpoint.CheckpointRestore(restored)))
    assert_same_batches(take(restored, 2), expected)


# ---------------------------------------------------------------------------- tokenizers, files
@pytest.fixture
def tokenizer_json(tmp_path):
    import tokenizers
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.WordLevelTrainer(special_tokens=["[UNK]", "<pad>"])
    tok.train_from_iterator(["alpha beta gamma delta epsilon zeta eta"], trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def test_jsonl_with_tokenizer_json(tmp_path, tokenizer_json):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": d.decode(), "id": i})
                              for i, d in enumerate(DOCS)) + "\n\n")
    cfg = JsonlData(paths=(str(tmp_path / "*.jsonl"),), tokenizer=tokenizer_json,
                    seq_len=4, batch_size=2, eval_fraction=0.0)
    vocab = data.get_vocab(cfg)
    assert (vocab.size, vocab.eos_id, vocab.pad_id) == (10, 9, 1)    # 9 words + appended EOS
    assert data.vocab_size(cfg) == 10
    stream = data.lm_streams(cfg)[0]
    assert stream.num_tokens == 2 + 7 + 1 + 9 + 4                      # words + one EOS each
    batch = next(data.train_iterator(cfg))
    assert batch["inputs"].max() < 10
    assert vocab.decode(stream.window(0)[0]) == "alpha beta gamma gamma"


def test_bad_input_errors(tmp_path, text_files):
    with pytest.raises(ValueError, match="data.source: must be one of"):
        load_train_config("tiny", ["data.source=web"])
    with pytest.raises(ValueError, match="DataConfig.seq_len: must be >= 2"):
        StdlibData(seq_len=1)
    with pytest.raises(ValueError, match="DataConfig.paths: source='text' needs"):
        TextData()
    with pytest.raises(ValueError, match="DataConfig.seq_len: the longest khop example"):
        KhopData(seq_len=32)
    with pytest.raises(ValueError, match="DataConfig.khop_facts: must exceed"):
        KhopData(khop_facts=8, khop_eval_hops=(8,))
    with pytest.raises(ValueError, match="^data.tokenizer: not a field of the 'addition' source"):
        load_train_config("tiny", ["data.source=addition", "data.tokenizer=tok.json",
                                   "model.max_seq_len=64", "data.seq_len=64"])
    assert KhopData(khop_eval_hops=[2, 3]).khop_eval_hops == (2, 3)
    with pytest.raises(FileNotFoundError, match="no file matches"):
        data.train_iterator(TextData(paths=(str(tmp_path / "*.none"),)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.train_iterator(TextData(paths=(str(tmp_path / "missing.txt"),)))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        data.vocab_size(TextData(paths=tuple(text_files),
                                 tokenizer=str(tmp_path / "nope.json")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no field 'text'"):
        data.train_iterator(JsonlData(paths=(str(bad),)))
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="corpus is empty"):
        data.train_iterator(TextData(paths=(str(empty),)))


def test_tokenizer_file_errors(tmp_path, monkeypatch):
    broken = tmp_path / "broken.json"
    broken.write_text("{}")
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "tokenizers", None)
        with pytest.raises(ImportError, match="pip install tokenizers"):
            load_vocab(str(broken))
    with pytest.raises(ValueError, match="cannot read .*broken.json"):
        load_vocab(str(broken))


def test_stdlib_files_are_sorted_python_sources():
    files = corpus.stdlib_files()
    assert files == sorted(files) and len(files) > 100
