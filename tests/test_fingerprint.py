"""The data fingerprint: stored in every checkpoint, a changed corpus refused on resume naming
what changed, an override for the training files, never for a moved held-out split."""

import hashlib
import os

import jax
import jax.numpy as jnp
import pytest

from mythos_jax.parallel.mesh import make_mesh
from mythos_jax.train import data
from mythos_jax.checkpoints.training import Checkpointer
from mythos_jax.train.config import load_train_config
from mythos_jax.train import fingerprint as fingerprint_lib
from mythos_jax.train.fingerprint import data_changes, data_fingerprint
from mythos_jax.train.step import build_plan, init_train_state


@pytest.fixture
def corpus_dir(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(10):
        (folder / f"doc{i}.txt").write_bytes(b"word %d " % i * (5 + i))
    yield folder
    data._store.cache_clear()          # a test's edits must not reach later tests' streams


def overrides(folder):
    return ["data.source=text", f"data.paths=['{folder}/*.txt']", "data.eval_fraction=0.2",
            "checkpoint.async_save=false"]


def config(folder):
    return load_train_config("tiny", overrides(folder))


def heldout_files(cfg):
    held = data.lm_streams(cfg)[1].docs
    return {held.store.paths[i] for i in held.doc_ids}


def changed(corpus_folder, edit):
    """Apply ``edit`` to the corpus and forget the cached streams (a new process would)."""
    edit(corpus_folder)
    data._store.cache_clear()


@pytest.fixture(scope="module")
def initial_state():
    """The tiny preset's initial TrainState on one device, as at step 1 (the corpus does not
    change it: the text source's byte vocabulary is the stdlib source's)."""
    plan = build_plan(load_train_config("tiny"), make_mesh("data=1", jax.devices()[:1]))
    return init_train_state(plan)._replace(step=jnp.int32(1))


@pytest.fixture
def checkpointed(corpus_dir, tmp_path, initial_state):
    """A checkpoint at step 1 of the text corpus; returns a function making a Checkpointer
    for the same config now."""
    cfg = config(corpus_dir)
    plan = build_plan(cfg, make_mesh("data=1", jax.devices()[:1]))
    checkpointer = Checkpointer(str(tmp_path / "run"), plan)
    checkpointer.save(1, initial_state, data.train_iterator(cfg.data))
    checkpointer.close()
    return lambda: Checkpointer(str(tmp_path / "run"), plan)


def test_fingerprint_lists_files_counts_and_split(corpus_dir):
    cfg = config(corpus_dir).data
    fingerprint = data_fingerprint(cfg)
    assert [size for _, size, _ in fingerprint["files"]] == [
        (corpus_dir / f"doc{i}.txt").stat().st_size for i in range(10)]
    assert [digest for _, _, digest in fingerprint["files"]] == [
        hashlib.sha256((corpus_dir / f"doc{i}.txt").read_bytes()).hexdigest()[:16]
        for i in range(10)]
    assert fingerprint["train"]["documents"] == 8 and fingerprint["heldout"]["documents"] == 2
    train, held = data.lm_streams(cfg)
    assert fingerprint["train"]["windows"] == train.num_windows
    assert fingerprint["heldout"]["tokens"] == held.num_tokens
    assert data_changes(fingerprint, data_fingerprint(cfg)) == []
    assert data_fingerprint(load_train_config("khop").data) == {"source": "khop_graph"}


def test_same_data_resumes(checkpointed):
    assert int(checkpointed().restore().step) == 1


def _grow_a_training_file(corpus_dir) -> str:
    train_doc = sorted(set(map(str, corpus_dir.glob("*.txt"))) - heldout_files(
        config(corpus_dir).data))[0]
    changed(corpus_dir, lambda _: open(train_doc, "ab").write(b"more text"))
    return train_doc


def test_a_changed_training_file_is_refused_unless_allowed(checkpointed, corpus_dir, capsys):
    train_doc = _grow_a_training_file(corpus_dir)
    with pytest.raises(ValueError, match=rf"files changed size: {train_doc}.*train\.tokens: "
                                         r".*--allow-data-change"):
        checkpointed().check_data(1)
    checkpointed().check_data(1, allow_data_change=True)
    assert "warning: training on changed data" in capsys.readouterr().out


def test_train_command_refuses_changed_data_in_one_line_unless_allow_data_change(
        checkpointed, corpus_dir, tmp_path, capsys):
    """``mythos-jax train`` on the workdir after a training file grew: exit 2 and one line
    naming the file and the flag; with ``--allow-data-change`` it resumes (step 1 of 1, so
    only the final evaluation runs)."""
    from mythos_jax.cli import main

    train_doc, run = _grow_a_training_file(corpus_dir), tmp_path / "run"
    argv = ["train", "--config", "tiny", "--workdir", str(run)] + [
        a for o in overrides(corpus_dir) + ["steps=1", "eval.loops=[1]", "log.tensorboard=false"]
        for a in ("--set", o)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the training data changed since checkpoint 1 (files changed "
                          f"size: {train_doc}") and err.count("\n") == 1, err
    assert err.rstrip().endswith("or accept it with --allow-data-change")
    assert main(argv + ["--allow-data-change"]) == 0
    out = capsys.readouterr().out
    assert f"warning: training on changed data (files changed size: {train_doc}" in out
    assert f"resumed from {run}/checkpoints at step 1\n" in out


def test_a_moved_heldout_split_is_refused_even_when_allowed(checkpointed, corpus_dir):
    held_doc = sorted(heldout_files(config(corpus_dir).data))[0]
    changed(corpus_dir, lambda folder: (folder / held_doc).unlink())
    with pytest.raises(ValueError, match=rf"held-out split moved \(files removed: {held_doc}"
                                         r".*leak into eval"):
        checkpointed().check_data(1, allow_data_change=True)


def test_a_glob_matching_more_files_is_named(checkpointed, corpus_dir):
    changed(corpus_dir, lambda folder: (folder / "new.txt").write_bytes(b"new document"))
    with pytest.raises(ValueError, match=rf"files added: {corpus_dir}/new\.txt"):
        checkpointed().check_data(1)


def test_a_same_size_edit_is_named(checkpointed, corpus_dir):
    """An edit that keeps every size and count (one byte replaced) shows in the digests."""
    train_doc = sorted(set(map(str, corpus_dir.glob("*.txt"))) - heldout_files(
        config(corpus_dir).data))[0]
    text = open(train_doc, "rb").read()
    changed(corpus_dir, lambda _: open(train_doc, "wb").write(b"X" + text[1:]))
    with pytest.raises(ValueError, match=rf"files changed content: {train_doc}"):
        checkpointed().check_data(1)


def test_digests_are_computed_once_per_file_version(tmp_path, monkeypatch):
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for f in files:
        f.write_bytes(b"one")
    computed = []
    real = fingerprint_lib._sha256
    monkeypatch.setattr(fingerprint_lib, "_sha256", lambda p: computed.append(p) or real(p))
    cache = str(tmp_path / "digests.json")
    first = fingerprint_lib.file_digests(list(map(str, files)), cache)
    assert fingerprint_lib.file_digests(list(map(str, files)), cache) == first
    assert len(computed) == 2                                    # the second call read none
    files[0].write_bytes(b"two")                                 # same size, new content
    os.utime(files[0], ns=(0, os.stat(files[1]).st_mtime_ns + 10 ** 9))
    again = fingerprint_lib.file_digests(list(map(str, files)), cache)
    assert len(computed) == 3 and again[str(files[0])] != first[str(files[0])]
