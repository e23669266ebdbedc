"""Runs in a ``gs://`` bucket, against a real GCS API (fake-gcs-server, tests/gcs_emulator.py):
train, checkpoint, resume and eval; logs that are uploaded, never rewritten; the bucket lock;
model checkpoints committed with a marker; generate and parity reading bucket checkpoints."""

import json
import os
import socket
import time

import numpy as np
import pytest
from tensorboardX.proto.event_pb2 import Event

from gcs_emulator import GcsEmulator
from lock_race import race_for_the_lock
from mythos_jax import paths
from mythos_jax.train import workdir_lock
from mythos_jax.train.config import load_train_config
from mythos_jax.train.trainer import read_metrics, train
from mythos_jax.train.workdir_lock import WorkdirBusy, WorkdirLock

RUN = ["checkpoint.async_save=false", "log.peak_flops=1e9", "eval.loops=[1]", "eval.batches=1"]


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    server = GcsEmulator(str(tmp_path_factory.mktemp("gcs")),
                         str(tmp_path_factory.mktemp("gcs-log") / "access.log"))
    saved = {k: os.environ.get(k) for k in server.environment()}
    os.environ.update(server.environment())
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture
def gcs(gcs_server, tmp_path, monkeypatch):
    """The emulator, with the test running in ``tmp_path/cwd`` (where a URL turned into a
    local path would land: tests check that it stays empty)."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return gcs_server


def event_tags(data: bytes) -> dict[str, list[int]]:
    """tag -> steps of the scalars in a TensorBoard event file (TFRecords of Event protos)."""
    tags, offset = {}, 0
    while offset < len(data):
        length = int.from_bytes(data[offset:offset + 8], "little")
        event = Event.FromString(data[offset + 12:offset + 12 + length])
        offset += 16 + length
        for value in event.summary.value:
            tags.setdefault(value.tag, []).append(event.step)
    return tags


def uploads(requests) -> list[str]:
    """The object names of the uploads among ``requests`` (each a new object generation);
    "?" for a multipart upload, whose name is in its body (google-cloud-storage's: the lock)."""
    names = []
    for method, target in requests:
        if method == "POST" and target.startswith("/upload/") and "upload_id=" not in target:
            query = dict(p.split("=", 1) for p in target.split("?", 1)[1].split("&"))
            names.append(query.get("name", "?"))
    return names


def test_train_resume_and_eval_in_a_bucket(gcs, tmp_path, capsys):
    from mythos_jax.cli import main
    bucket = gcs.new_bucket()
    run = f"{bucket}/run"
    cfg = load_train_config("tiny", ["steps=4", "checkpoint.every=2", "log.every=2",
                                     "log.tensorboard=true", *RUN])
    assert train(cfg, run, stop_after=2)["step"] == 2
    resumed = train(cfg, run)
    assert resumed["step"] == 4 and resumed["plot"] == f"{run}/depth_curve.png"
    assert f"resumed from {run}/checkpoints at step 2" in capsys.readouterr().out
    assert main(["eval", "--workdir", run, "--batches", "1", "--json", f"{bucket}/eval.json"]) == 0
    assert "checkpoint step 4" in capsys.readouterr().out

    stored = gcs.local(run)
    assert {"train_config.json", "depth_curve.png", "checkpoints"} <= set(os.listdir(stored))
    assert sorted(os.listdir(os.path.join(stored, "checkpoints"))) == ["2", "4"]
    assert "heldout" in json.loads(open(gcs.local(f"{bucket}/eval.json")).read())
    assert [r["step"] for r in read_metrics(run) if "eval" not in r] == [1, 2, 3, 4]
    tags = {}
    for name in os.listdir(os.path.join(stored, "tensorboard")):
        with open(os.path.join(stored, "tensorboard", name), "rb") as f:
            for tag, steps in event_tags(f.read()).items():
                tags.setdefault(tag, []).extend(steps)
    assert sorted(tags["train/loss"]) == [2, 4]
    assert tags["eval/heldout/loss_1loops"] == [4]          # tensorboardX: @ -> _
    assert os.listdir(tmp_path / "cwd") == []               # nothing became a local gs:/ folder


@pytest.mark.parametrize("steps", [4, 16])
def test_logging_costs_the_same_requests_whatever_the_run_length(gcs, steps):
    """A fresh run with a log line at every step downloads none of its logs and uploads each
    log object once: a metrics part and an event file before the final checkpoint, and again
    after the final evaluation; 4 objects for 4 steps as for 16."""
    bucket = gcs.new_bucket()
    cfg = load_train_config("tiny", [f"steps={steps}", "log.every=1", "checkpoint.every=1000",
                                     "log.tensorboard=true", *RUN])
    train(cfg, f"{bucket}/run")
    requests = gcs.requests(bucket)
    logs = [n for n in uploads(requests) if "/metrics.jsonl" in n or "/tensorboard/" in n]
    assert len(logs) == len(set(logs)) == 4
    assert not [t for m, t in requests if m == "GET" and "/download/" in t and (
        "metrics.jsonl" in t or "/tensorboard/" in t)]
    assert [r["step"] for r in read_metrics(f"{bucket}/run") if "eval" not in r] == list(
        range(1, steps + 1))


def _lock_record(gcs, url) -> dict:
    with open(gcs.local(f"{url}/{workdir_lock.LOCK_FILE}")) as f:
        return json.load(f)


def _put_lock(url, **holder) -> None:
    record = {"host": socket.gethostname(), "pid": None, "started": "2026-01-01T00:00:00+00:00",
              "started_unix": time.time(), **holder}
    paths.write_text(f"{url}/{workdir_lock.LOCK_FILE}", json.dumps(record))


def test_a_bucket_lock_names_its_holder_refuses_a_second_trainer_and_is_released(gcs):
    url = gcs.new_bucket() + "/run"
    with WorkdirLock(url):
        assert _lock_record(gcs, url)["pid"] == os.getpid()
        with pytest.raises(WorkdirBusy, match=f"{url} is in use by another trainer: host "
                                              f"{socket.gethostname()}, pid {os.getpid()}"):
            WorkdirLock(url).acquire()
    assert not os.path.exists(gcs.local(f"{url}/{workdir_lock.LOCK_FILE}"))


@pytest.mark.parametrize("holder, silent_s, taken_over", [
    ({"host": "gone-host"}, 3600, True),          # silent an hour
    ({"host": "live-host"}, 0, False),            # beating
    ({"pid": 2 ** 22 + 1}, 0, True),              # this host, gone
])
def test_a_bucket_lock_is_taken_over_only_from_a_holder_that_is_gone(gcs, capsys, holder,
                                                                     silent_s, taken_over):
    url = gcs.new_bucket() + "/run"     # the heartbeat's age counted from now, not collection
    _put_lock(url, **holder, heartbeat_unix=time.time() - silent_s)
    lock = WorkdirLock(url)
    if not taken_over:
        with pytest.raises(WorkdirBusy, match="host live-host"):
            lock.acquire()
        return
    lock.acquire()
    assert "taking over the lock of a trainer that is gone" in capsys.readouterr().out
    assert _lock_record(gcs, url)["pid"] == os.getpid()
    lock.release()


def test_the_bucket_lock_holder_keeps_its_heartbeat_fresh(gcs, monkeypatch):
    monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.2)
    url = gcs.new_bucket() + "/run"
    with WorkdirLock(url):
        first = _lock_record(gcs, url)["heartbeat_unix"]
        time.sleep(1.0)
        assert _lock_record(gcs, url)["heartbeat_unix"] > first


def test_only_one_of_many_racing_takers_of_a_stale_bucket_lock_wins(gcs):
    url = gcs.new_bucket() + "/run"
    _put_lock(url, host="gone-host", heartbeat_unix=time.time() - 3600)
    won = race_for_the_lock(url, 6)
    assert len(won) == 1
    won[0].release()


def test_a_model_checkpoint_in_a_bucket_is_committed_last_and_read_only_when_committed(gcs):
    from flax import nnx

    from mythos_jax import OpenMythos, variants
    from mythos_jax.checkpoints.load import load_model
    from mythos_jax.checkpoints.model import COMMIT_FILE, is_checkpoint, save_model
    url = gcs.new_bucket() + "/model"
    model = OpenMythos(variants.tiny_gqa(), rngs=nnx.Rngs(0))
    save_model(model, url)
    save_model(model, url, overwrite=True)
    bucket_objects = [p.name for p in paths.resolve(os.path.dirname(url)).iterdir()]
    assert is_checkpoint(url) and bucket_objects == ["model"]     # no temporary left
    np.testing.assert_array_equal(np.asarray(load_model(url).embed[...]),
                                  np.asarray(model.embed[...]))
    paths.resolve(f"{url}/{COMMIT_FILE}").unlink()      # a save stopped while copying
    assert not is_checkpoint(url)
    with pytest.raises(ValueError, match=f"missing {COMMIT_FILE} \\(its save did not finish\\)"):
        load_model(url)
    save_model(model, url, overwrite=True)               # and a new save replaces it
    assert is_checkpoint(url)


def test_generate_reads_a_checkpoint_in_a_bucket(gcs, tmp_path, capsys):
    from flax import nnx

    from mythos_jax import OpenMythos, variants
    from mythos_jax.checkpoints.model import save_model
    from mythos_jax.cli import main
    model = OpenMythos(variants.tiny_mla(), rngs=nnx.Rngs(0))
    url = gcs.new_bucket() + "/model"
    save_model(model, url)
    save_model(model, tmp_path / "local")
    texts = []
    for source in (url, str(tmp_path / "local")):
        assert main(["generate", "--checkpoint", source, "--prompt", "hi", "--max-new-tokens",
                     "4", "--temperature", "0"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("hi")


@pytest.mark.parametrize("src, dst", [("gs://bucket/model.pt", "out"),
                                      ("runs/x", "gs://bucket/model.safetensors")])
def test_convert_refuses_weight_files_in_a_bucket(src, dst, capsys):
    from mythos_jax.cli import main

    assert main(["convert", src, dst]) == 2
    assert "files are read and written locally" in capsys.readouterr().err


def test_a_failed_log_upload_is_retried_then_kept_for_the_next_sync(gcs, monkeypatch):
    from etils import epath

    from mythos_jax.train import log_files
    monkeypatch.setattr(log_files.time, "sleep", lambda s: None)
    real_write, failures = epath.Path.write_text, []

    def flaky(self, text, *args, **kwargs):
        if failures:
            failures.pop()
            raise ConnectionError("transient")
        return real_write(self, text, *args, **kwargs)

    monkeypatch.setattr(epath.Path, "write_text", flaky)
    log = log_files.LineLog(gcs.new_bucket() + "/run/metrics.jsonl", upload_every_s=1e9)
    log.append('{"step": 1}\n', step=1)
    failures.extend([1] * (log_files.UPLOAD_ATTEMPTS - 1))       # fails, fails, fails, works
    log.sync()
    log.append('{"step": 2}\n', step=2)
    failures.extend([1] * log_files.UPLOAD_ATTEMPTS)             # every attempt fails
    with pytest.warns(UserWarning, match="upload failed 4 times \\(ConnectionError"):
        log.sync()
    assert log.pending and log_files.LineLog(log.path).read_text() == '{"step": 1}\n'
    log.sync()                                                   # the storage is back
    assert log_files.LineLog(log.path).read_text() == '{"step": 1}\n{"step": 2}\n'
