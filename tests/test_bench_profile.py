"""The op-time profiler of experiments/profile_vs_torch.py: HLO instructions classified by what
they compute, loop containers not counted twice, torch op names classified alike."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import pytest

from mythos_jax.bench.profile import (CATEGORIES, format_profiles, hlo_instruction_kinds,
                                      jax_profile, torch_category)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _looped(x, w, idx):
    def body(h, _):
        return jnp.tanh(h @ w), None
    h, _ = jax.lax.scan(body, x, None, length=3)
    return jnp.sort(h[:4], axis=-1).sum() + jnp.take(h, idx, axis=0).sum()


@pytest.fixture(scope="module")
def compiled_grad():
    args = (jnp.ones((512, 512)), jnp.eye(512) * 0.5, jnp.arange(8))
    compiled = jax.jit(jax.grad(_looped, argnums=1)).lower(*args).compile()
    return compiled, args


def test_instructions_are_classified_by_what_they_compute(compiled_grad):
    kinds = hlo_instruction_kinds(compiled_grad[0].as_text())
    by_kind = {}
    for kind, phase in kinds.values():
        by_kind.setdefault(kind, set()).add(phase)
    assert {"forward", "backward"} <= by_kind["matmul"]      # the dots of both passes
    assert "sort/top-k" in by_kind and "gather/scatter" in by_kind
    assert None in by_kind                                   # the while loops: not counted
    assert all(kind in CATEGORIES or kind is None for kind in by_kind)


def test_profile_attributes_a_matmul_bound_call_to_matmuls(compiled_grad):
    compiled, args = compiled_grad
    profile = jax_profile(lambda: compiled(*args), compiled.as_text(), reps=2)
    ms = profile["ms"]
    assert set(ms) == set(CATEGORIES) and profile["unclassified"] == []
    ops = {k: v for k, v in ms.items() if k != "runtime"}     # runtime grows on a busy machine
    assert ms["matmul"] == max(ops.values()) > 0, ms
    assert profile["op_ms_summed"] <= profile["wall_ms"] * 2.2  # loop bodies not counted twice
    assert sum(ms.values()) == pytest.approx(profile["wall_ms"])   # on two threads at most
    table = format_profiles({"a": profile, "b": profile}, matmul_flops=1e9, peak_flops=1e12)
    assert table.count("matmul") == 2 and "% peak" in table


def test_torch_op_names_are_classified():
    assert [torch_category(op) for op in ("aten::addmm", "aten::bmm", "aten::index_add_",
                                          "aten::topk", "aten::copy_", "aten::silu")] == [
        "matmul", "matmul", "gather/scatter", "sort/top-k", "copy/layout", "elementwise"]


def test_script_profiles_both_sides_and_the_trainers_step(tmp_path, capsys):
    """experiments/profile_vs_torch.py --quick on the MoE layer (both sides) and on the
    trainer's step of `make train` (ours only, with its MFU)."""
    spec = importlib.util.spec_from_file_location(
        "profile_vs_torch", os.path.join(REPO, "experiments", "profile_vs_torch.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "profile.json"
    assert script.main(["--quick", "--only", "moe,make_train", "--reps", "1",
                        "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "== moe" in printed and "== make_train" in printed
    assert "speedup" in printed and "MFU of the profiled steps" in printed
    result = json.loads(out.read_text())
    assert result["contention"] is None or 0 <= result["contention"] <= 1
    targets = result["targets"]
    assert set(targets["moe"]) == {"open-mythos", "mythos-jax", "matmul_flops"}
    assert set(targets["make_train"]) == {"mythos-jax", "matmul_flops"}
    for side in (targets["moe"]["open-mythos"], targets["moe"]["mythos-jax"],
                 targets["make_train"]["mythos-jax"]):
        assert side["ms"]["matmul"] > 0
        assert sum(side["ms"].values()) == pytest.approx(side["wall_ms"])
    with pytest.raises(SystemExit):
        script.parse_args(["--only", "nope"])
    assert "unknown target(s) ['nope']" in capsys.readouterr().err
