"""The path layer: URLs stay URLs, unknown schemes are refused, local writes are atomic and
durable (runs in a bucket: tests/test_buckets.py)."""

import os

import pytest

from mythos_jax import paths


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
    assert target.read_text() == "two" and os.listdir(tmp_path) == ["a.json"]


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
