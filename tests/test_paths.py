"""The path layer: URLs stay URLs, unknown schemes are refused, writes are atomic; and a whole
run (train, checkpoint, resume, eval) in a fake ``gs://`` bucket."""

import json
import os
import types

import pytest
from etils import epath
from orbax.checkpoint._src.path import gcs_utils
from tensorboardX import record_writer
from tensorboardX.proto.event_pb2 import Event

from mythos_jax import paths
from mythos_jax.train.config import load_train_config
from mythos_jax.train.trainer import read_metrics, train


def test_bucket_urls_stay_urls_and_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(paths.resolve("gs://b/run")) == "gs://b/run"
    assert os.fspath(paths.join("gs://b/run", "checkpoints")) == "gs://b/run/checkpoints"
    assert os.fspath(paths.resolve("runs/a")) == str(tmp_path / "runs" / "a")
    assert os.fspath(paths.resolve("file:///x/y")) == "/x/y"
    assert paths.is_remote("gs://b/x") and not paths.is_remote("gs:/b/x")


@pytest.mark.parametrize("url", ["s3://b/run", "memory://run", "hdfs://n/p", "gs://"])
def test_unknown_schemes_are_refused_naming_the_path(url):
    with pytest.raises(ValueError, match=f"'{url}': unsupported path"):
        paths.resolve(url)


def test_local_writes_are_atomic_and_leave_no_temporary_file(tmp_path):
    target = tmp_path / "a.json"
    paths.write_text(target, "one")
    paths.write_text(target, "two")
    paths.append_text(target, "+")
    assert target.read_text() == "two+" and os.listdir(tmp_path) == ["a.json"]


def test_local_writes_sync_the_bytes_before_the_rename_and_the_folder_after(tmp_path,
                                                                          monkeypatch):
    """A crash after the rename cannot leave an empty file in place of the old one."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(
        ("fsync", os.path.isdir(f"/proc/self/fd/{fd}"))) or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", None))
                        or real_replace(a, b))
    paths.write_text(tmp_path / "a.json", "one")
    assert events == [("fsync", False), ("replace", None), ("fsync", True)]


@pytest.fixture
def fake_bucket(tmp_path, monkeypatch):
    """``gs://`` served from ``tmp_path/gcs``: epath's calls, the TensorStore spec Orbax
    builds for a bucket and tensorboardX's object uploads are redirected there, and a
    flat-namespace bucket stands in for google-cloud-storage's; the code under test sees only
    URLs. The test runs in
    ``tmp_path/cwd``, where a URL turned into a local path would land."""
    root = str(tmp_path / "gcs")

    def local(path):
        text = os.fspath(path)
        return os.path.join(root, text[5:]) if text.startswith("gs://") else text

    def url(path):
        text = os.fspath(path)
        return "gs://" + os.path.relpath(text, root) if text.startswith(root) else text

    def one(fn, path, *args, **kwargs):
        return fn(local(path), *args, **kwargs)

    def two(fn, path, dst, *args, **kwargs):
        return fn(local(path), local(dst), *args, **kwargs)

    def glob(fn, pattern):
        return [url(p) for p in fn(local(pattern))]

    def walk(fn, top, **kwargs):
        for directory, dirs, files in fn(local(top), **kwargs):
            yield url(directory), dirs, files

    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs",
                        lambda path: {"driver": "file", "path": local(path)})
    monkeypatch.setattr(gcs_utils, "get_bucket",
                        lambda name: types.SimpleNamespace(hierarchical_namespace_enabled=False))

    class Blob:     # google-cloud-storage's, as tensorboardX's gs:// event writer uses it
        def __init__(self, name, bucket):
            self.path, self.generation = os.path.join(root, bucket.name, name), None

        def upload_from_string(self, data, if_generation_match=None):
            assert if_generation_match == self.generation     # the object tensorboardX wrote
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "wb") as f:
                f.write(data)
            self.generation = (self.generation or 0) + 1

    monkeypatch.setattr(record_writer, "storage", types.SimpleNamespace(
        Client=lambda: None, Bucket=lambda client, name: types.SimpleNamespace(name=name),
        Blob=Blob))
    monkeypatch.setattr(record_writer, "GCS_ENABLED", True)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    with epath.testing.mock_epath(
            open=one, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, remove=one,
            rmtree=one, stat=one, rename=two, replace=two, copy=two, glob=glob, walk=walk):
        yield tmp_path / "gcs"


def event_tags(path) -> dict[str, list[int]]:
    """tag -> steps of the scalars in a TensorBoard event file (TFRecords of Event protos)."""
    data, tags, offset = path.read_bytes(), {}, 0
    while offset < len(data):
        length = int.from_bytes(data[offset:offset + 8], "little")
        event = Event.FromString(data[offset + 12:offset + 12 + length])
        offset += 16 + length
        for value in event.summary.value:
            tags.setdefault(value.tag, []).append(event.step)
    return tags


def test_train_resume_and_eval_in_a_bucket(fake_bucket, tmp_path, capsys):
    from mythos_jax.cli import main
    cfg = load_train_config("tiny", ["steps=4", "checkpoint.every=2", "log.every=2",
                                     "log.tensorboard=true", "log.peak_flops=1e9",
                                     "eval.loops=[1]", "eval.batches=1",
                                     "checkpoint.async_save=false"])
    first = train(cfg, "gs://bucket/run", stop_after=2)
    assert first["step"] == 2
    resumed = train(cfg, "gs://bucket/run")
    assert resumed["step"] == 4 and resumed["plot"] == "gs://bucket/run/depth_curve.png"
    assert "resumed from gs://bucket/run/checkpoints at step 2" in capsys.readouterr().out
    assert main(["eval", "--workdir", "gs://bucket/run", "--batches", "1",
                 "--json", "gs://bucket/eval.json"]) == 0
    assert "checkpoint step 4" in capsys.readouterr().out

    run = fake_bucket / "bucket" / "run"
    assert {"train_config.json", "metrics.jsonl", "depth_curve.png", "checkpoints"} <= set(
        os.listdir(run))
    assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]
    assert "heldout" in json.loads((fake_bucket / "bucket" / "eval.json").read_text())
    assert [r["step"] for r in read_metrics("gs://bucket/run") if "eval" not in r] == [1, 2, 3, 4]
    # TensorBoard: one event file per train call, uploaded as objects under the workdir.
    first_events, resumed_events = (event_tags(p) for p in sorted(
        (run / "tensorboard").iterdir(), key=lambda p: os.stat(p).st_mtime))
    assert first_events["train/loss"] == [2] and resumed_events["train/loss"] == [4]
    assert resumed_events["eval/heldout/loss_1loops"] == [4]      # tensorboardX: @ -> _
    assert os.listdir(tmp_path / "cwd") == []          # nothing became a local gs:/ folder


def test_model_checkpoint_saves_and_loads_in_a_bucket(fake_bucket, tmp_path):
    import numpy as np
    from flax import nnx

    from mythos_jax import OpenMythos, variants
    from mythos_jax.checkpoints.load import load_model
    from mythos_jax.checkpoints.model import is_checkpoint, save_model
    model = OpenMythos(variants.tiny_gqa(), rngs=nnx.Rngs(0))
    save_model(model, "gs://bucket/model")
    save_model(model, "gs://bucket/model", overwrite=True)
    assert is_checkpoint("gs://bucket/model")
    np.testing.assert_array_equal(np.asarray(load_model("gs://bucket/model").embed[...]),
                                  np.asarray(model.embed[...]))
    assert os.listdir(fake_bucket / "bucket") == ["model"]
    assert os.listdir(tmp_path / "cwd") == []


@pytest.mark.parametrize("src, dst", [("gs://bucket/model.pt", "out"),
                                      ("runs/x", "gs://bucket/model.safetensors")])
def test_convert_refuses_weight_files_in_a_bucket(src, dst, capsys):
    from mythos_jax.cli import main

    assert main(["convert", src, dst]) == 2
    assert "files are read and written locally" in capsys.readouterr().err
