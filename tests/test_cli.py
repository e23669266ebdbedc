"""mythos-jax CLI: convert (both directions), parity, generate, and the error paths."""

import json
import os

import numpy as np
import pytest
import torch
from flax import nnx

from mythos_jax import variants
from mythos_jax.checkpoints.load import load_model
from mythos_jax.checkpoints.model import is_checkpoint
from mythos_jax.cli import build_parser, main
from mythos_jax.interop.openmythos import config_to_torch, import_reference


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
    ("text_file", "expected an OpenMythos .pt/.pth/.safetensors file"),
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


def test_parity_command_prints_the_table_writes_json_and_fails_on_a_bad_row(
        tmp_path, capsys, monkeypatch):
    """What the command adds over tests/parity (which checks the comparison itself): the
    table's format, the JSON and the exit code, on stubbed rows."""
    from mythos_jax.interop import parity

    good = {"attn_type": "mla", "loops": 3, "seq_len": 24, "batch": 3,
            "max_abs_diff": 1.5e-5, "max_abs_logit": 31.25, "rel_diff": 4.8e-7, "ok": True}
    bad = {**good, "attn_type": "gqa", "loops": 6, "seq_len": 1, "max_abs_diff": 2.0,
           "max_abs_logit": 20.0, "rel_diff": 0.1, "ok": False}
    header = [f"parity with open-mythos 0.5.0 (fp32 CPU, tolerance {parity.LOGIT_RTOL:.1e} "
              f"x max|logit|)",
              " attn    loops  seq_len  max|diff|  max|logit|  relative  ok"]
    out_json = tmp_path / "parity.json"
    for rows, code, lines in [
            ([good], 0, ["  mla        3       24   1.50e-05       31.25  4.80e-07  yes"]),
            ([good, bad], 1, ["  mla        3       24   1.50e-05       31.25  4.80e-07  yes",
                              "  gqa        6        1   2.00e+00       20.00  1.00e-01  NO"])]:
        monkeypatch.setattr(parity, "parity_report", lambda rows=rows: rows)
        assert main(["parity", "--no-bench", "--json", str(out_json)]) == code
        assert capsys.readouterr().out.splitlines() == header + lines + [
            f"figures written to {out_json}"]
        assert json.loads(out_json.read_text()) == {"parity": rows}


# ---------------------------------------------------------------------------- generate
def _greedy_text(prompt: str, n: int, eos_id=None) -> str:
    """What ``generate --variant tiny_mla --seed 0 --temperature 0`` should print."""
    from mythos_jax.commands.generate import _decode_tokens
    from mythos_jax.inference.generate import generate
    from mythos_jax.model import OpenMythos

    model = OpenMythos(variants.tiny_mla(), rngs=nnx.Rngs(0))
    result = generate(model, [list(prompt.encode())], n, temperature=0.0, eos_id=eos_id)
    row = [int(t) for t in result.tokens[0][:result.lengths[0]]]
    if eos_id is not None and row and row[-1] == eos_id:
        row = row[:-1]
    return prompt + _decode_tokens(row)


def test_generate_greedy_streams_the_continuation(capsys):
    from mythos_jax.commands.generate import _escape

    assert main(["generate", "--variant", "tiny_mla", "--prompt", "hi", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("hi") and captured.out.endswith("\n")
    assert captured.out == _escape(_greedy_text("hi", 5), keep="\n\t") + "\n"
    assert "5 tokens in" in captured.err


def test_generate_stops_at_eos(capsys):
    first = _greedy_text("hi", 1)[2:]
    assert len(first) == 1 and ord(first) < 128       # tiny_mla's first greedy byte
    assert main(["generate", "--variant", "tiny_mla", "--prompt", "hi", "--max-new-tokens", "5",
                 "--temperature", "0", "--eos-id", str(ord(first))]) == 0
    captured = capsys.readouterr()
    assert captured.out == "hi\n"                    # EOS at once, and it is not printed
    assert "1 tokens in" in captured.err


def test_chat_keeps_the_cache_and_answers_like_one_generation(capsys, monkeypatch):
    """Two sampled turns on stdin: each reply is what one generation over the conversation so
    far (turn text + newline, earlier replies) samples with the turn's seed (seed + turn)."""
    import io

    from mythos_jax.commands.generate import _decode_tokens, _escape
    from mythos_jax.inference.generate import generate
    from mythos_jax.model import OpenMythos

    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nand again\n\n"))
    assert main(["chat", "--variant", "tiny_mla", "--max-new-tokens", "6", "--seed", "0"]) == 0
    model = OpenMythos(variants.tiny_mla(), rngs=nnx.Rngs(0))
    conversation, replies = [], []
    for turn, text in enumerate(["hello there\n", "and again\n"]):
        conversation += list(text.encode())
        result = generate(model, [conversation], 6, temperature=1.0, seed=turn)
        reply = [int(t) for t in result.tokens[0]]
        conversation += reply
        replies.append(_escape(_decode_tokens(reply), keep="\n\t") + "\n")
    assert len(set("".join(replies))) > 3                 # sampled text, not one repeated byte
    assert capsys.readouterr().out == "".join(replies)


def test_generate_batch_prints_one_line_per_prompt(capsys):
    assert main(["generate", "--variant", "tiny_mla", "--prompt", "hi", "--prompt", "a\nb",
                 "--max-new-tokens", "4", "--top-k", "5", "--top-p", "0.9", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("hi") and lines[1].startswith("a\\nb")   # newline escaped
    assert captured.err.startswith("[0] hi")          # the first sequence streamed to stderr


@pytest.mark.parametrize("extra, message", [
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-k", "0"], "top_k must be >= 1"),
    (["--eos-id", "256"], "outside the vocabulary [0, 256)"),
    (["--max-new-tokens", "100"], "exceeds the model's max_seq_len 64"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--n-loops", "0"], "--loops must be >= 1"),         # OpenMythos's flag name too
])
def test_generate_errors(capsys, extra, message):
    assert main(["generate", "--variant", "tiny_mla", "--prompt", "hi", *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and message in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_generate_needs_a_byte_vocabulary(tmp_path, capsys):
    from mythos_jax.checkpoints.model import save_model
    from mythos_jax.model import OpenMythos

    ckpt = tmp_path / "small_vocab"
    save_model(OpenMythos(variants.tiny_mla(vocab_size=128), rngs=nnx.Rngs(0)), ckpt)
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {ckpt}: no tokenizer.json is stored with this model (a vocabulary of 128 ids, "
        "not byte level): give its tokenizer with --tokenizer")
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", "hi",
                 "--tokenizer", "bytes"]) == 2
    assert "need vocab_size >= 256" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["generate", "--variant", "no_such_model", "--prompt", "hi"]) == 2
    assert "unknown variant" in capsys.readouterr().err


def test_generate_byte_stream_decodes_incrementally():
    import io

    from mythos_jax.commands.generate import _ByteStream, _decode_tokens

    out = io.StringIO()
    stream = _ByteStream(out, eos_id=0)
    for token in "é€\x1b".encode() + bytes([0xFF]):
        stream.push(token)
    stream.push(300)
    stream.push(0)                                    # EOS: nothing after it is printed
    stream.push(ord("x"))
    stream.close()
    assert out.getvalue() == "é€\\x1b\ufffd<300>"
    assert _decode_tokens(list("é".encode()) + [300, 0xC3]) == "é<300>\ufffd"
