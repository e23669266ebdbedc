"""Memory budget: a KV cache sized by --n-loops and a checkpoint whose config asks for huge
shapes are refused, naming the fields, before anything is allocated."""

import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mythos_jax import OpenMythos, variants
from mythos_jax.budget import LIMIT_VARIABLE, check_fits, memory_limit, tree_bytes
from mythos_jax.checkpoints.load import load_model
from mythos_jax.checkpoints.model import save_model
from mythos_jax.cli import main
from mythos_jax.inference.generate import generate


def test_tree_bytes_counts_abstract_leaves():
    tree = {"a": jax.ShapeDtypeStruct((4, 8), jnp.float32), "b": [jnp.zeros(3, jnp.int8)]}
    assert tree_bytes(tree) == 4 * 8 * 4 + 3


def test_limit_comes_from_the_environment_or_the_machine(monkeypatch):
    monkeypatch.setenv(LIMIT_VARIABLE, "2e9")
    assert memory_limit() == (2_000_000_000, f"${LIMIT_VARIABLE}")
    check_fits("x", 2_000_000_000, "lower y")
    with pytest.raises(ValueError, match=r"x would need 1.86 GiB, more than the 1.86 GiB.*lower y"):
        check_fits("x", 2_000_000_001, "lower y")
    monkeypatch.delenv(LIMIT_VARIABLE)
    limit, source = memory_limit()
    assert limit > 0 and source == "available host RAM"


def test_huge_n_loops_is_refused_before_the_cache_exists():
    """10**9 loop depths would be terabytes of cache: refused, not allocated."""
    model = OpenMythos(variants.tiny_mla(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"the KV cache would need .* lower loops=1000000000"):
        generate(model, [[1, 2]], 2, n_loops=10**9)


def test_generate_command_names_loops(capsys, monkeypatch):
    monkeypatch.setenv(LIMIT_VARIABLE, "1e6")
    assert main(["generate", "--variant", "tiny_mla", "--prompt", "hi", "--loops",
                 "4096"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the KV cache would need") and "loops=4096" in err


def test_checkpoint_config_asking_for_huge_shapes_is_refused(tmp_path):
    path = tmp_path / "ckpt"
    save_model(OpenMythos(variants.tiny_mla(), rngs=nnx.Rngs(0)), path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "vocab_size": 10**11}))
    with pytest.raises(ValueError, match=rf"the parameters of {path} would need .* "
                                         r"vocab_size=100000000000"):
        load_model(path)


def test_per_device_bytes_follow_the_sharding():
    from jax.sharding import NamedSharding, PartitionSpec

    from mythos_jax.budget import per_device_bytes
    from mythos_jax.parallel.mesh import make_mesh
    mesh = make_mesh("data=4", jax.devices()[:4])
    tree = {"w": jax.ShapeDtypeStruct((8, 16), jnp.float32)}
    split = {"w": NamedSharding(mesh, PartitionSpec("data"))}
    copied = {"w": NamedSharding(mesh, PartitionSpec())}
    assert per_device_bytes(tree, split) == 2 * 16 * 4
    assert per_device_bytes(tree, copied) == 8 * 16 * 4


def test_eval_of_a_workdir_whose_config_asks_for_huge_shapes_is_refused(tmp_path, capsys):
    from mythos_jax.train.config import load_train_config
    (tmp_path / "train_config.json").write_text(
        load_train_config("tiny", ["model.vocab_size=100000000000"]).to_json())
    (tmp_path / "checkpoints").mkdir()              # a workdir, checked before any restore
    assert main(["eval", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "the training state of" in err and "vocab_size=100000000000" in err
