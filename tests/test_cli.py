"""mythos-jax CLI: ``convert`` both ways (.pt -> checkpoint dir -> .pt) and its error path."""

import json
import os

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from mythos_jax import variants  # noqa: E402
from mythos_jax.checkpoint import is_checkpoint, load_model  # noqa: E402
from mythos_jax.cli import build_parser, main  # noqa: E402
from mythos_jax.interop.openmythos import config_to_torch, import_reference  # noqa: E402


@pytest.fixture(scope="module")
def torch_checkpoint(tmp_path_factory):
    """An OpenMythos training checkpoint with a random (non-zero) router bias."""
    ref = import_reference()
    cfg = variants.tiny_mla()
    torch.manual_seed(0)
    model = ref.OpenMythos(config_to_torch(cfg)).eval()
    with torch.no_grad():
        model.recurrent.block.ffn.router_bias.copy_(torch.randn(cfg.n_experts))
    path = tmp_path_factory.mktemp("torch") / "step_0000005.pt"
    torch.save({"model": model.state_dict(), "cfg": config_to_torch(cfg), "step": 5}, path)
    return model, path


def test_convert_round_trip(torch_checkpoint, tmp_path, capsys):
    torch_model, pt = torch_checkpoint
    ckpt, back = tmp_path / "ckpt", tmp_path / "back.pt"

    assert main(["convert", str(pt), str(ckpt)]) == 0
    out = capsys.readouterr().out.strip()
    n_params = sum(p.numel() for p in torch_model.parameters())  # head tied to embed: once
    assert out.startswith(f"wrote mythos-jax checkpoint {ckpt}") and f"{n_params:,} param" in out
    assert is_checkpoint(ckpt)

    assert main(["convert", str(ckpt), str(back)]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"wrote OpenMythos checkpoint {back}") and f"{n_params:,} param" in out
    assert sorted(os.listdir(tmp_path)) == ["back.pt", "ckpt"]     # no temporary files left

    original = torch_model.state_dict()
    restored = torch.load(back, map_location="cpu", weights_only=False)["model"]
    assert restored.keys() == original.keys()
    for key, tensor in original.items():
        assert restored[key].dtype == tensor.dtype, key
        assert torch.equal(restored[key], tensor), key
    assert torch.equal(restored["recurrent.block.ffn.router_bias"],
                       torch_model.recurrent.block.ffn.router_bias)

    ids = np.random.default_rng(0).integers(0, 256, size=(2, 8))
    with torch.no_grad():
        want = torch_model(torch.from_numpy(ids)).numpy()
    got = np.asarray(nnx.jit(lambda m, x: m(x))(load_model(ckpt), ids.astype(np.int32)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_convert_respects_overwrite(torch_checkpoint, tmp_path, capsys):
    _, pt = torch_checkpoint
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert main(["convert", str(pt), str(ckpt)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(pt), str(ckpt), "--overwrite"]) == 0   # empty dir: replaced
    assert is_checkpoint(ckpt)


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file or directory"),
    ("text_file", "expected an OpenMythos .pt/.pth file or a mythos-jax checkpoint directory"),
    ("plain_dir", "is not a mythos-jax checkpoint: missing config.json and state/"),
    ("garbage_pt", "cannot read as an OpenMythos checkpoint"),
])
def test_convert_errors(tmp_path, capsys, case, message):
    src = tmp_path / {"missing": "nope.pt", "text_file": "notes.txt", "plain_dir": "dir",
                      "garbage_pt": "broken.pt"}[case]
    if case == "text_file":
        src.write_text("hello")
    elif case == "plain_dir":
        src.mkdir()
    elif case == "garbage_pt":
        src.write_bytes(b"not a torch file")
    dst = tmp_path / ("out.pt" if case == "plain_dir" else "out")
    assert main(["convert", str(src), str(dst)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err and str(src) in err
    assert not dst.exists()


def test_parser_has_subcommands():
    parser = build_parser()
    args = parser.parse_args(["convert", "a.pt", "b", "--overwrite"])
    assert (args.src, args.dst, args.overwrite) == ("a.pt", "b", True)
    with pytest.raises(SystemExit) as info:
        parser.parse_args([])                    # a subcommand is required
    assert info.value.code == 2


def test_parity_command_prints_a_passing_table(tmp_path, capsys):
    out_json = tmp_path / "parity.json"
    assert main(["parity", "--no-bench", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "parity with open-mythos 0.5.0" in printed and " NO" not in printed
    rows = json.loads(out_json.read_text())["parity"]
    assert {r["attn_type"] for r in rows} == {"mla", "gqa"}
    assert {r["n_loops"] for r in rows} == {1, 2, 3, 6}
    assert all(r["ok"] and r["max_abs_diff"] <= 1e-4 for r in rows)
