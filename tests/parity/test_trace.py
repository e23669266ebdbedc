"""The per-stage trace against open-mythos 0.5.0 (``mythos-jax parity --trace``): OpenMythos
read through forward hooks, mythos-jax through its traced forward, on perturbed weights
(``build_pair``) so that routing varies and positions halt at different loops."""

import copy
import json

import numpy as np
import pytest
import torch

from mythos_jax.cli import main
from mythos_jax.interop.openmythos import config_to_torch
from mythos_jax.interop.parity import build_pair
from mythos_jax.interop.trace import (compare, format_report, jax_trace, torch_trace,
                                      trace_parity)
from mythos_jax.interop.trace.compare import halting_loops

N_LOOPS = 3   # OpenMythos runs all 3 on IDS (its whole-batch break fires at 4-5)
IDS = np.random.default_rng(0).integers(0, 211, (2, 12))    # parity_config's vocab: 211


def _pair(attn_type):
    torch_model, jax_model = build_pair(attn_type)
    return torch_model, jax_model, jax_trace(jax_model, IDS, N_LOOPS)


@pytest.fixture(scope="module")
def mla():
    return _pair("mla")


@pytest.fixture(scope="module")
def gqa():
    return _pair("gqa")


def _stage_names(cfg):
    return (["embed"] + [f"prelude {i}" for i in range(cfg.prelude_layers)]
            + [f"loop {t}" for t in range(N_LOOPS)] + ["recurrent"]
            + [f"coda {i}" for i in range(cfg.coda_layers)] + ["logits"])


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_fp32_trace_agrees_within_1e_5_at_every_stage(request, attn_type):
    torch_model, jax_model, jax_side = request.getfixturevalue(attn_type)
    torch_side = torch_trace(torch_model, IDS, N_LOOPS)
    result = compare(torch_side, jax_side, tolerance=1e-5)
    rows = result["rows"]
    assert [r["stage"] for r in rows] == _stage_names(jax_model.cfg)
    assert result["first_over"] is None
    assert all(r["rel_diff"] <= 1e-5 and r["cosine"] > 1 - 1e-9 for r in rows), rows
    loops = [r for r in rows if r["stage"].startswith("loop ")]
    assert all(r["topk_agreement"] == 1.0 and r["halted_agreement"] == 1.0 for r in loops)
    assert all(r["act_weight_max_diff"] <= 1e-5 and r["halt_p_max_diff"] <= 1e-5
               for r in loops)
    assert all(r["rho_reference"] == pytest.approx(r["rho_other"], rel=1e-6) for r in loops)
    assert all(r["delta_reference"] == pytest.approx(r["delta_other"], rel=1e-4)
               for r in loops)
    assert result["halting_agreement"] == 1.0
    # Not vacuous: positions halt at different loops (some within N_LOOPS), tokens pick
    # different experts, and h changes from loop to loop.
    halted_at = halting_loops(torch_side.loops["halted"])
    assert len(np.unique(halted_at)) >= 2 and (halted_at >= 0).any()
    choices = torch_side.loops["expert_ids"].reshape(-1, jax_model.cfg.n_experts_per_tok)
    assert len(np.unique(choices, axis=0)) >= 3
    assert all(r["delta_reference"] > 1e-3 for r in loops)


def test_an_altered_lora_scale_is_located_at_its_loop(mla):
    torch_model, _, jax_side = mla
    altered = copy.deepcopy(torch_model)
    with torch.no_grad():
        altered.recurrent.lora.scale.weight[2] += 0.5            # loop t = 2's LoRA scale
    result = compare(torch_trace(altered, IDS, N_LOOPS), jax_side, tolerance=1e-5)
    assert result["first_over"] == "loop 2"
    by_stage = {r["stage"]: r for r in result["rows"]}
    assert by_stage["loop 1"]["rel_diff"] <= 1e-5 < by_stage["loop 2"]["rel_diff"]
    assert "first stage over tolerance: loop 2" in format_report(
        {"ids_shape": list(IDS.shape), "attn_type": "mla", "loops": N_LOOPS,
         "comparisons": [{"name": "altered", **result}]})


def test_bf16_comparison_is_finite_and_drifts_more_than_fp32(mla):
    torch_model, jax_model, _ = mla
    report = trace_parity(torch_model, jax_model, IDS, N_LOOPS, dtype="bfloat16")
    *bf16, fp32 = report["comparisons"]
    assert [c["name"] for c in bf16] == ["mythos-jax bf16 vs OpenMythos bf16 (autocast)",
                                         "OpenMythos bf16 vs its fp32",
                                         "mythos-jax bf16 vs its fp32"]
    fp32_rel = {r["stage"]: r["rel_diff"] for r in fp32["rows"]}
    for comparison in bf16:
        rows = [r for r in comparison["rows"] if "missing" not in r]
        assert len(rows) == len(_stage_names(jax_model.cfg))          # every loop compared
        for r in rows:
            assert np.isfinite([r["max_abs_diff"], r["rel_diff"], r["cosine"]]).all()
            if r["stage"] != "embed":                                  # a gather: exact
                assert r["rel_diff"] > 10 * fp32_rel[r["stage"]], (comparison["name"], r)
    assert report["ok"] == (bf16[0]["first_over"] is None)
    printed = format_report(report)
    assert all(c["name"] in printed for c in report["comparisons"])


def test_cli_trace_json_on_a_converted_openmythos_file(mla, tmp_path, capsys):
    torch_model, jax_model, _ = mla
    pt, out = tmp_path / "perturbed.pt", tmp_path / "trace.json"
    torch.save({"model": torch_model.state_dict(), "cfg": config_to_torch(jax_model.cfg)}, pt)
    assert main(["parity", "--trace", "--checkpoint", str(pt), "--loops", str(N_LOOPS),
                 "--seq-len", "12", "--json", str(out)]) == 0
    assert "first stage over tolerance: none" in capsys.readouterr().out
    report = json.loads(out.read_text())
    (comparison,) = report["comparisons"]
    assert report["ok"] and report["dtype"] == "float32" and report["ids_shape"] == [2, 12]
    assert [r["stage"] for r in comparison["rows"]] == _stage_names(jax_model.cfg)
    assert all(r["rel_diff"] <= 1e-5 for r in comparison["rows"])


@pytest.mark.parametrize("args", [["--plot", "x.png"], ["--dtype", "bfloat16"],
                                  ["--trace", "--loops", "0"]])
def test_cli_trace_options_are_checked(args, capsys):
    assert main(["parity", "--no-bench", *args]) == 2
    assert capsys.readouterr().err.startswith("error: --")
