"""mythos_jax.checkpoints.model: save/load round trip, overwrite rules, bad paths, atomicity."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from mythos_jax import OpenMythos, variants
from mythos_jax.checkpoints.load import load_model
from mythos_jax.checkpoints.model import is_checkpoint, load_config, save_model

IDS = jnp.asarray(np.random.default_rng(0).integers(0, 256, size=(2, 8)), jnp.int32)


def _perturbed_model(cfg, seed=0):
    """A model whose every array is moved away from its initial value (router bias included)."""
    model = OpenMythos(cfg, rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Not(nnx.RngState))
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed + 100)      # numpy noise: no per-shape XLA compiles
    # Committed to device 0 like restored arrays, so that both models share one compiled
    # forward (jit keys its cache on committed-ness and would otherwise compile twice).
    device = jax.devices()[0]
    leaves = [jax.device_put(np.asarray(x) + 0.01 * rng.standard_normal(x.shape, np.float32),
                             device) for x in leaves]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


@nnx.jit
def _forward(model, ids):
    """Jitted logits (B, T, vocab): eager dispatch of the looped model is several times slower."""
    return model(ids)


def _arrays(model):
    """Every leaf of nnx.state(model) as numpy (typed PRNG keys as their raw key data)."""
    def raw(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)
    flat = jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]
    return {jax.tree_util.keystr(path): raw(x) for path, x in flat}


@pytest.fixture(scope="module", params=["tiny_mla", "tiny_gqa"])
def saved(request, tmp_path_factory):
    cfg = getattr(variants, request.param)()
    model = _perturbed_model(cfg)
    bias = model.recurrent.block.ffn.router_bias[...]
    assert float(jnp.max(jnp.abs(bias))) > 0, "router_bias must be away from its zero init"
    path = tmp_path_factory.mktemp(request.param) / "ckpt"
    save_model(model, path)
    return model, path


def test_round_trip_is_bitwise(saved):
    model, path = saved
    loaded = load_model(path)
    assert isinstance(loaded, OpenMythos)
    assert loaded.cfg == model.cfg
    want, got = _arrays(model), _arrays(loaded)
    assert want.keys() == got.keys()
    assert any("router_bias" in k for k in got)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    fresh = OpenMythos(model.cfg, rngs=nnx.Rngs(0))  # the loaded weights are not the init ones
    assert not np.array_equal(_arrays(fresh)["['embed'].value"], got["['embed'].value"])
    np.testing.assert_array_equal(np.asarray(_forward(loaded, IDS)),
                                  np.asarray(_forward(model, IDS)))


def test_layout_and_config(saved):
    model, path = saved
    assert sorted(os.listdir(path)) == ["config.json", "state"]
    assert is_checkpoint(path)
    assert load_config(path) == model.cfg
    assert not [n for n in os.listdir(path.parent) if n != "ckpt"], "temporary dirs left behind"


def test_dropout_rng_state_round_trips(tmp_path):
    cfg = variants.tiny_mla(dropout=0.2)
    model = OpenMythos(cfg, rngs=nnx.Rngs(3))
    for _ in range(3):                           # advance the dropout stream's counter
        model.dropout_rngs.dropout()
    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    assert int(loaded.dropout_rngs.dropout.count[...]) == 3
    want, got = model.dropout_rngs.dropout(), loaded.dropout_rngs.dropout()  # next mask key
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(got)),
                                  np.asarray(jax.random.key_data(want)))
    assert int(loaded.dropout_rngs.dropout.count[...]) == 4


def test_existing_path_needs_overwrite(tmp_path):
    path = tmp_path / "ckpt"
    first = _perturbed_model(variants.tiny_gqa(), seed=1)
    second = _perturbed_model(variants.tiny_gqa(), seed=2)
    save_model(first, path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_model(second, path)
    np.testing.assert_array_equal(np.asarray(load_model(path).embed[...]),
                                  np.asarray(first.embed[...]))
    save_model(second, path, overwrite=True)
    np.testing.assert_array_equal(np.asarray(load_model(path).embed[...]),
                                  np.asarray(second.embed[...]))
    assert os.listdir(tmp_path) == ["ckpt"]


def test_overwrite_refuses_foreign_directory(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a mythos-jax checkpoint"):
        save_model(OpenMythos(variants.tiny_gqa(), rngs=nnx.Rngs(0)), target, overwrite=True)
    assert (target / "notes.txt").read_text() == "keep me"
    assert os.listdir(tmp_path) == ["precious"]


@pytest.mark.parametrize("layout, missing", [
    ({}, "missing config.json and state/"),
    ({"config.json": "file"}, "missing state/"),
    ({"state": "dir"}, "missing config.json"),
])
def test_not_a_checkpoint(tmp_path, layout, missing):
    path = tmp_path / "ckpt"
    path.mkdir()
    for name, kind in layout.items():
        (path / name).mkdir() if kind == "dir" else (path / name).write_text("{}")
    with pytest.raises(ValueError) as info:
        load_model(path)
    assert str(path) in str(info.value) and missing in str(info.value)
    assert "not a mythos-jax checkpoint" in str(info.value)


def test_missing_path(tmp_path):
    with pytest.raises(ValueError, match=r"nowhere.*not a mythos-jax checkpoint.*no such file"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"file: expected an OpenMythos \.pt/\.pth/\.safetensors"):
        load_model(tmp_path / "file")


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    model = OpenMythos(variants.tiny_mla(), rngs=nnx.Rngs(0))

    def boom(self, *args, **kwargs):
        raise KeyboardInterrupt("simulated crash during the Orbax write")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, tmp_path / "ckpt")
    assert os.listdir(tmp_path) == []


def test_interrupted_overwrite_keeps_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    old = _perturbed_model(variants.tiny_gqa(), seed=4)
    save_model(old, path)

    def boom(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(OpenMythos(variants.tiny_gqa(), rngs=nnx.Rngs(0)), path, overwrite=True)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt"]
    np.testing.assert_array_equal(np.asarray(load_model(path).embed[...]),
                                  np.asarray(old.embed[...]))
