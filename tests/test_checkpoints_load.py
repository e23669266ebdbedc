"""From a training run to generation and PyTorch: every reader of a model takes a training
workdir, one of its checkpoints or a model checkpoint; export and convert write the others."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file

from mythos_jax.checkpoints.load import load_model, load_model_and_source
from mythos_jax.checkpoints.model import is_checkpoint
from mythos_jax.cli import main
from mythos_jax import OpenMythos, variants
from mythos_jax.interop.openmythos import (config_to_torch, import_reference, load_state_dict,
                                           to_torch_state_dict)
from mythos_jax.train.config import load_train_config
from mythos_jax.checkpoints.load import training_source
from mythos_jax.train.trainer import train

QUICK = ["steps=4", "checkpoint.every=2", "log.every=2", "log.tensorboard=false",
         "eval.loops=[1]", "checkpoint.async_save=false"]
IDS = np.random.default_rng(0).integers(0, 256, size=(2, 8))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A finished 4-step run of the tiny preset (OpenMythos numerics): checkpoints at steps
    2 and 4."""
    path = str(tmp_path_factory.mktemp("train") / "run")
    train(load_train_config("tiny", QUICK), path)
    return path


def _logits(model) -> np.ndarray:
    return np.asarray(nnx.jit(lambda m, x: m(x))(model, IDS.astype(np.int32)))


def _torch_logits(state_dict, cfg) -> np.ndarray:
    """OpenMythos (PyTorch) with ``state_dict`` loaded strictly."""
    torch_model = import_reference().OpenMythos(config_to_torch(cfg)).eval()
    torch_model.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        return torch_model(torch.from_numpy(IDS)).numpy()


def test_training_sources_are_recognised(workdir, tmp_path):
    assert training_source(workdir) == (workdir, None)
    assert training_source(os.path.join(workdir, "checkpoints", "2")) == (workdir, 2)
    assert training_source(workdir, 2) == (workdir, 2)
    assert training_source(tmp_path) is None


def test_load_model_reads_a_workdir_a_step_and_a_checkpoint_directory(workdir):
    latest, source = load_model_and_source(workdir)
    assert source == f"training step 4 of {workdir}"
    step_2 = load_model(workdir, step=2)
    same_2 = load_model(os.path.join(workdir, "checkpoints", "2"))
    np.testing.assert_array_equal(_logits(step_2), _logits(same_2))
    assert not np.array_equal(_logits(latest), _logits(step_2))
    with pytest.raises(ValueError, match="is the checkpoint of step 2, not 4"):
        load_model(os.path.join(workdir, "checkpoints", "2"), step=4)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint step 3 .* \(steps: 2, 4\)"):
        load_model(workdir, step=3)


def test_export_writes_a_standalone_model_checkpoint(workdir, tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["export", workdir, str(out), "--step", "2"]) == 0
    assert f"from {workdir} (training step 2 of {workdir})" in capsys.readouterr().out
    assert is_checkpoint(out) and sorted(os.listdir(out)) == ["config.json", "state"]
    np.testing.assert_array_equal(_logits(load_model(out)), _logits(load_model(workdir, step=2)))
    with pytest.raises(ValueError, match="holds one model"):
        load_model(out, step=2)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_convert_a_run_to_openmythos_gives_the_same_logits_in_pytorch(workdir, tmp_path, suffix):
    out = tmp_path / f"model{suffix}"
    assert main(["convert", os.path.join(workdir, "checkpoints", "4"), str(out)]) == 0
    model = load_model(workdir)
    state_dict = (load_file(out) if suffix == ".safetensors"
                  else _safe_payload(out)["model"])
    np.testing.assert_allclose(_torch_logits(state_dict, model.cfg), _logits(model),
                               atol=1e-4, rtol=0)
    back = load_model(out)                      # and back into JAX, from the file alone
    np.testing.assert_allclose(_logits(back), _logits(model), atol=1e-6, rtol=0)


def _safe_payload(path):
    with torch.serialization.safe_globals([import_reference().MythosConfig]):
        return torch.load(path, map_location="cpu", weights_only=True)


def test_load_state_dict_names_every_bad_key():
    """Two missing, two unexpected and two mis-shaped keys: one ValueError naming all six;
    the untouched state_dict loads."""
    cfg = variants.tiny_mla()
    good = to_torch_state_dict(OpenMythos(cfg, rngs=nnx.Rngs(0)))
    keys = sorted(k for k in good if k not in ("embed.weight", "head.weight"))
    missing, reshaped, extra = keys[:2], keys[-2:], ["extra.weight", "recurrent.extra"]
    bad = {k: v for k, v in good.items() if k not in missing}
    bad.update({k: torch.zeros(tuple(good[k].shape) + (2,)) for k in reshaped})
    bad.update({k: torch.zeros(3) for k in extra})
    with pytest.raises(ValueError, match=r"\(6 problem\(s\)\)") as error:
        load_state_dict(cfg, bad)
    message = str(error.value)
    for key in missing:
        assert f"missing key {key!r}" in message
    for key in extra:
        assert f"unexpected key {key!r}" in message
    for key in reshaped:
        assert f"key {key!r} has shape {tuple(good[key].shape) + (2,)}" in message
    loaded = load_state_dict(cfg, good)
    np.testing.assert_array_equal(loaded.embed[...], good["embed.weight"].numpy())


def test_generate_from_a_workdir_is_quiet_on_a_cpu_host(workdir):
    """A subprocess as a user runs it: JAX_PLATFORMS unset (libtpu installed, no TPU)."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    result = subprocess.run(
        [sys.executable, "-m", "mythos_jax.cli", "generate", "--checkpoint", workdir,
         "--prompt", "hi", "--max-new-tokens", "3", "--temperature", "0"],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("hi")
    assert result.stderr.splitlines()[0] == f"model: training step 4 of {workdir}"
    for noise in ("E0000", "libtpu", "TPU", "WARNING"):
        assert noise not in result.stderr, result.stderr


def test_eval_reads_a_checkpoint_directory_and_refuses_a_model(workdir, tmp_path, capsys):
    assert main(["eval", "--workdir", os.path.join(workdir, "checkpoints", "2"),
                 "--batches", "1"]) == 0
    assert "checkpoint step 2" in capsys.readouterr().out
    model_dir = tmp_path / "model"
    assert main(["export", workdir, str(model_dir)]) == 0
    capsys.readouterr()
    assert main(["eval", "--workdir", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert f"{model_dir} is a model checkpoint; eval needs a training workdir" in err


def test_parity_of_a_trained_model_against_pytorch(workdir, tmp_path, capsys):
    out_json = tmp_path / "parity.json"
    assert main(["parity", "--checkpoint", workdir, "--step", "2", "--json", str(out_json)]) == 0
    captured = capsys.readouterr()
    assert "parity with open-mythos 0.5.0" in captured.out and " NO" not in captured.out
    assert f"model: training step 2 of {workdir}" in captured.err
    rows = json.loads(out_json.read_text())
    assert "benchmark" not in rows and all(r["ok"] for r in rows["parity"])


def test_parity_trace_of_a_trained_model_against_pytorch(workdir, tmp_path, capsys):
    out_json, png = tmp_path / "trace.json", tmp_path / "trace.png"
    assert main(["parity", "--trace", "--checkpoint", workdir, "--seq-len", "8",
                 "--json", str(out_json), "--plot", str(png)]) == 0
    captured = capsys.readouterr()
    assert f"model: training step 4 of {workdir}" in captured.err
    assert "first stage over tolerance: none" in captured.out
    report = json.loads(out_json.read_text())
    (comparison,) = report["comparisons"]
    assert report["ok"] and report["ids_shape"] == [2, 8] and report["loops"] == 4
    stages = [r["stage"] for r in comparison["rows"]]
    assert stages[:2] == ["embed", "prelude 0"] and stages[-1] == "logits"
    assert all(r["rel_diff"] <= 1e-5 for r in comparison["rows"] if "missing" not in r)
    assert png.read_bytes().startswith(b"\x89PNG")
    # The run exported through the converter traces the same, figure for figure.
    exported, exported_json = tmp_path / "run.pt", tmp_path / "exported.json"
    assert main(["convert", workdir, str(exported)]) == 0
    assert main(["parity", "--trace", "--checkpoint", str(exported), "--seq-len", "8",
                 "--json", str(exported_json)]) == 0
    assert json.loads(exported_json.read_text()) == report


def test_a_workdir_whose_corpus_is_gone_still_exports_converts_and_generates(tmp_path, capsys):
    """A run trained on text files elsewhere (a pod run copied to a laptop): its stored
    config carries the vocabulary size, so the readers need only the checkpoint; eval, which
    needs the held-out text, says so in one line, and so does resuming training."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"{i}.txt").write_text(f"def f{i}(x):\n    return x * {i}\n" * 40)
    overrides = QUICK + ["data.source=text", f"data.paths=[{corpus}/*.txt]"]
    work = tmp_path / "run"
    train(load_train_config("tiny", overrides), str(work))
    corpus.rename(tmp_path / "elsewhere")
    capsys.readouterr()
    assert main(["convert", str(work), str(tmp_path / "model")]) == 0
    assert main(["export", str(work), str(tmp_path / "model.pt")]) == 0
    assert main(["generate", "--checkpoint", str(work), "--prompt", "def",
                 "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    assert main(["eval", "--workdir", str(work)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "eval needs the run's held-out data" in err
    assert f"{corpus}/" in err
    assert main(["train", "--config", "tiny", "--workdir", str(work)]
                + [a for o in overrides + ["steps=6"] for a in ("--set", o)]) == 2
    assert "DataConfig.paths" in capsys.readouterr().err
