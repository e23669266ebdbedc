"""OpenMythos weight files: a .pt is read without running code from it; .safetensors both
ways; what cannot be converted is refused by name."""

import os

import numpy as np
import pytest
import torch
from flax import nnx

from mythos_jax import variants
from mythos_jax.cli import main
from mythos_jax.interop.files import load_openmythos_file, save_openmythos_file
from mythos_jax.interop.openmythos import config_to_torch, import_reference
from mythos_jax.model import OpenMythos


class _RunsACommand:
    """Unpickling this calls ``os.system``: what a malicious checkpoint does."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An OpenMythos checkpoint as its training script writes it, after a few AdamW steps."""
    cfg = variants.tiny_mla()
    torch.manual_seed(0)
    model = import_reference().OpenMythos(config_to_torch(cfg))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        logits = model(torch.randint(0, cfg.vocab_size, (2, 8)))
        logits.float().logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    path = tmp_path_factory.mktemp("torch") / "step_0000003.pt"
    torch.save({"step": 3, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "cfg": config_to_torch(cfg), "vocab_size": cfg.vocab_size}, path)
    return model.eval(), path


def _logits(model, ids):
    return np.asarray(nnx.jit(lambda m, x: m(x))(model, ids.astype(np.int32)))


def test_a_training_script_checkpoint_loads_with_its_logits(trained):
    torch_model, path = trained
    ids = np.random.default_rng(1).integers(0, 256, size=(2, 8))
    with torch.no_grad():
        want = torch_model(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(_logits(load_openmythos_file(path), ids), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path, capsys, zip_format):
    marker = tmp_path / "it_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model": _RunsACommand(f"touch {marker}"), "cfg": {}}, evil,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ValueError, match=r"evil\.pt: refusing to load: it needs posix\.system"):
        load_openmythos_file(evil)
    assert main(["convert", str(evil), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {evil}: refusing to load") and err.count("\n") == 1
    assert "posix.system" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_safetensors_round_trip_and_strict_pytorch_load(trained, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    torch_model, path = trained
    model = load_openmythos_file(path)
    out = tmp_path / "model.safetensors"
    save_openmythos_file(model, str(out))
    with safe_open(out, framework="np") as f:
        assert '"dim": 64' in f.metadata()["mythos_config"]
    state_dict = load_file(out)
    fresh = import_reference().OpenMythos(config_to_torch(model.cfg))
    fresh.load_state_dict(state_dict, strict=True)
    for key, tensor in torch_model.state_dict().items():
        assert torch.equal(state_dict[key], tensor), key
    back = load_openmythos_file(out)
    ids = np.arange(16).reshape(2, 8)
    np.testing.assert_array_equal(_logits(back, ids), _logits(model, ids))


def test_safetensors_without_a_config_is_named(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "bare.safetensors"
    save_file({"embed.weight": np.zeros((4, 4), np.float32)}, str(path))
    with pytest.raises(ValueError, match="bare.safetensors: no 'mythos_config' in the"):
        load_openmythos_file(path)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.safetensors: cannot read as a safetensors"):
        load_openmythos_file(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("option, named", [({"injection": "parcae"}, "injection='parcae'"),
                                           ({"act": "off"}, "act='off'")])
def test_options_openmythos_lacks_are_refused_by_name(tmp_path, capsys, option, named):
    from mythos_jax.checkpoints.model import save_model

    ckpt = tmp_path / "model"
    save_model(OpenMythos(variants.tiny_mla(**option), rngs=nnx.Rngs(0)), ckpt)
    for out in ("out.pt", "out.safetensors"):
        assert main(["convert", str(ckpt), str(tmp_path / out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and named in err and err.count("\n") == 1
        assert not (tmp_path / out).exists()
