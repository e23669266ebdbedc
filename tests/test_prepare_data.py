"""mythos-jax prepare-data: ArrayRecord shards that read back as the same batches."""

import argparse
import json
import os

import numpy as np
import pytest

from mythos_jax.commands import prepare_data
from mythos_jax.train import data
from mythos_jax.train.data_config import ArrayRecordData, JsonlData, TextData

DOCS = ["alpha beta", "", "gamma " * 9, "delta", "epsilon zeta eta " * 3, "beta alpha"]


def parse(*argv):
    parser = argparse.ArgumentParser()
    prepare_data.add_arguments(parser)
    return parser.parse_args(argv)


def batches(cfg, n=6):
    iterator = data.train_iterator(cfg)
    return [next(iterator) for _ in range(n)] + data.eval_batches(cfg, "heldout")


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_text_files_round_trip_through_shards(tmp_path, capsys):
    for i, doc in enumerate(DOCS):
        (tmp_path / f"doc{i}.txt").write_text(doc)
    out = tmp_path / "shards"
    argv = ["--input", str(tmp_path / "*.txt"), "--output", str(out), "--records-per-shard", "2"]
    assert prepare_data.run(parse(*argv)) == 0
    assert "wrote 5 documents" in capsys.readouterr().out
    meta = json.loads((out / "metadata.json").read_text())
    assert [s["records"] for s in meta["shards"]] == [2, 2, 1] and meta["skipped_empty"] == 1
    assert (meta["vocab_size"], meta["eos_id"], meta["dtype"]) == (258, 256, "|u1")
    common = dict(seq_len=8, batch_size=2, eval_fraction=0.25, eval_examples=4)
    from_text = TextData(paths=(str(tmp_path / "*.txt"),), **common)
    from_shards = ArrayRecordData(paths=(str(out),), **common)
    assert data.vocab_size(from_shards) == 258
    assert_same(batches(from_shards), batches(from_text))

    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_data.run(parse(*argv))
    assert prepare_data.run(parse(*argv, "--overwrite")) == 0
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        prepare_data.run(parse(*argv, "--overwrite"))


def word_tokenizer(path) -> str:
    """A word-level tokenizer.json of DOCS at ``path`` (EOS "</s>"); its path."""
    import tokenizers
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator(DOCS, tokenizers.trainers.WordLevelTrainer(
        special_tokens=["[UNK]", "</s>"]))
    tok.save(str(path))
    return str(path)


def test_jsonl_with_tokenizer_round_trip(tmp_path):
    tok_path = word_tokenizer(tmp_path / "tokenizer.json")
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS))
    out = str(tmp_path / "shards")
    meta = prepare_data.prepare([str(source)], out, tokenizer=tok_path, jsonl_field="body")
    assert (meta["vocab_size"], meta["eos_id"], meta["pad_id"], meta["dtype"]) == (
        9, 1, 1, "<u2")                                  # EOS found in the vocabulary
    common = dict(seq_len=4, batch_size=2, eval_fraction=0.2, eval_examples=2)
    from_jsonl = JsonlData(paths=(str(source),), jsonl_field="body",
                           tokenizer=tok_path, **common)
    from_shards = ArrayRecordData(paths=(out,), **common)
    assert data.vocab_size(from_shards) == data.vocab_size(from_jsonl) == 9
    assert_same(batches(from_shards), batches(from_jsonl))


def test_overwrite_keeps_the_old_output_until_the_new_one_is_complete(tmp_path):
    """A failure half way (a bad JSON line after good documents) leaves the earlier output as
    it was and nothing beside it; a complete run replaces it."""
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS if d))
    bad.write_text(good.read_text() + "{not json\n")
    out = tmp_path / "shards"
    first = prepare_data.prepare([str(good)], str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError):
        prepare_data.prepare([str(bad)], str(out), overwrite=True, records_per_shard=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl", "shards"]
    (tmp_path / "more.jsonl").write_text(good.read_text())
    again = prepare_data.prepare([str(good), str(tmp_path / "more.jsonl")], str(out),
                                 overwrite=True)
    assert again["num_documents"] == 2 * first["num_documents"]
    assert json.loads((out / "metadata.json").read_text()) == again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl",
                                                          "more.jsonl", "shards"]


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="--input: no file matches"):
        prepare_data.prepare([str(tmp_path / "*.txt")], str(tmp_path / "out"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="no non-empty document"):
        prepare_data.prepare([str(tmp_path / "empty.txt")], str(tmp_path / "out"))
    os.makedirs(tmp_path / "half")
    with pytest.raises(FileNotFoundError, match="no metadata.json"):
        data.train_iterator(ArrayRecordData(paths=(str(tmp_path / "half"),)))


# ---------------------------------------------------------------------------- ids and metadata
def test_ids_are_checked_against_the_dtype_before_the_cast():
    prepare_data.check_ids(np.array([0, 65535]), 65536, np.dtype(np.uint16), 0)
    with pytest.raises(ValueError, match=r"document 3: token id 70000 is outside \[0, 65536\)"):
        prepare_data.check_ids(np.array([5, 70000]), 80000, np.dtype(np.uint16), 3)
    with pytest.raises(ValueError, match=r"token id 300 is outside \[0, 300\) \(vocab_size 300"):
        prepare_data.check_ids(np.array([300]), 300, np.dtype(np.uint16), 0)
    with pytest.raises(ValueError, match="token id -1"):
        prepare_data.check_ids(np.array([-1]), 300, np.dtype(np.uint16), 0)


def test_vocab_size_is_the_largest_id_plus_one(tmp_path):
    """A sparse vocabulary (ids 0, 1, 70000): size 70001 (not the count 3), so 70000 is kept
    (uint32 shards) and the appended EOS is past every real id."""
    import tokenizers
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {"[UNK]": 0, "alpha": 1, "omega": 70000}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "doc.txt").write_text("alpha omega alpha")
    meta = prepare_data.prepare([str(tmp_path / "doc.txt")], str(tmp_path / "out"),
                                tokenizer=str(tmp_path / "tokenizer.json"))
    assert (meta["vocab_size"], meta["eos_id"], meta["dtype"]) == (70002, 70001, "<u4")
    cfg = ArrayRecordData(paths=(str(tmp_path / "out"),), seq_len=3,
                          batch_size=1, eval_fraction=0.0)
    assert data.lm_streams(cfg)[0].window(0)[0].tolist() == [1, 70000, 1, 70001]


@pytest.fixture
def prepared(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta gamma")
    prepare_data.prepare([str(tmp_path / "a.txt")], str(tmp_path / "out"))
    return tmp_path / "out"


def rewrite_metadata(directory, **changes):
    meta = json.loads((directory / "metadata.json").read_text())
    (directory / "metadata.json").write_text(json.dumps({**meta, **changes}))


@pytest.mark.parametrize("changes, message", [
    ({"dtype": "<f8"}, "dtype must be one of"),
    ({"dtype": "|O"}, "dtype must be one of"),
    ({"vocab_size": 10**9}, r"vocab_size must be an int in \[1, 258\]"),
    ({"eos_id": 300}, r"eos_id must be an int in \[0, vocab_size=258\)"),
    ({"pad_id": "x"}, "pad_id must be an int"),
    ({"shards": [{"file": "../../etc/passwd", "records": 1}]}, "plain file names"),
    ({"shards": [{"file": "/etc/passwd", "records": 1}]}, "plain file names"),
    ({"shards": "shard-00000.array_record"}, "shards must list"),
    ({"num_tokens": 5}, r"lengths.npy lists 1 documents of 16 tokens, metadata.json 1 of 5"),
])
def test_bad_metadata_is_refused_naming_the_field(prepared, changes, message):
    rewrite_metadata(prepared, **changes)
    with pytest.raises(ValueError, match=message):
        data.train_iterator(ArrayRecordData(paths=(str(prepared),)))


def test_record_lengths_are_checked(prepared):
    np.save(prepared / "lengths.npy", np.array([15]))
    rewrite_metadata(prepared, num_tokens=15)
    cfg = ArrayRecordData(paths=(str(prepared),), seq_len=4, batch_size=1,
                          eval_fraction=0.0)
    with pytest.raises(ValueError, match=r"record 0 .* has 16 bytes, but lengths.npy says 15"):
        data.lm_streams(cfg)[0].window(0)
    np.save(prepared / "lengths.npy", np.array([[16]]))
    data._store.cache_clear()                  # the store of the same paths is cached
    with pytest.raises(ValueError, match="must be a 1-D array"):
        data.train_iterator(ArrayRecordData(paths=(str(prepared),)))


def test_the_tokenizer_travels_with_the_shards_the_run_and_the_exported_model(tmp_path, capsys):
    """prepare-data copies the tokenizer.json next to the shards, a run on them into its
    workdir, and convert into the model checkpoint: each usable after the original is gone;
    generate encodes and decodes with it (its words, never bytes), from the run or the model."""
    from mythos_jax.cli import main
    from mythos_jax.train.config import load_train_config
    from mythos_jax.train.tokenizer import TOKENIZER_FILE
    from mythos_jax.train.trainer import train
    (tmp_path / "tok").mkdir()
    original = word_tokenizer(tmp_path / "tok" / "tokenizer.json")
    (tmp_path / "docs.txt").write_text("\n".join(DOCS * 20))
    shards = tmp_path / "shards"
    prepare_data.prepare([str(tmp_path / "docs.txt")], str(shards), tokenizer=original)
    content = open(original, "rb").read()
    os.remove(original)
    assert (shards / TOKENIZER_FILE).read_bytes() == content
    cfg = load_train_config("tiny", [
        "data.source=arrayrecord", f"data.paths=[{shards}]", "data.seq_len=8",
        "data.eval_fraction=0.5", "steps=1", "eval.loops=[1]", "eval.batches=1",
        "log.tensorboard=false", "checkpoint.async_save=false"])
    assert data.get_vocab(cfg.data).name == str(shards / TOKENIZER_FILE)
    train(cfg, str(tmp_path / "run"))
    assert (tmp_path / "run" / TOKENIZER_FILE).read_bytes() == content
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "model")]) == 0
    assert (tmp_path / "model" / TOKENIZER_FILE).read_bytes() == content
    capsys.readouterr()
    texts = []
    for source in ("run", "model"):
        assert main(["generate", "--checkpoint", str(tmp_path / source), "--prompt",
                     "alpha beta", "--max-new-tokens", "5", "--temperature", "0"]) == 0
        texts.append(capsys.readouterr().out)
    words = set(json.loads(content)["model"]["vocab"]) - {"[UNK]"}
    assert texts[0] == texts[1] and texts[0].startswith("alpha beta")
    assert set(texts[0].split()) <= words, texts[0]
