"""The op-time profiler of experiments/profile_vs_torch.py: HLO instructions classified by what
they compute, loop containers not counted twice, torch op names classified alike."""

import jax
import jax.numpy as jnp
import pytest

from mythos_jax.bench.profile import (CATEGORIES, format_profiles, hlo_instruction_kinds,
                                      jax_profile, torch_category)


def _looped(x, w, idx):
    def body(h, _):
        return jnp.tanh(h @ w), None
    h, _ = jax.lax.scan(body, x, None, length=3)
    return jnp.sort(h, axis=-1)[:, :4].sum() + jnp.take(h, idx, axis=0).sum()


@pytest.fixture(scope="module")
def compiled_grad():
    args = (jnp.ones((256, 256)), jnp.eye(256) * 0.5, jnp.arange(8))
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
    assert ms["matmul"] == max(ops.values()) > 0
    covered = sum(ops.values())
    assert covered <= profile["wall_ms"] * 1.05                # loop bodies not counted twice
    assert sum(ms.values()) == pytest.approx(max(profile["wall_ms"], covered))
    table = format_profiles({"a": profile, "b": profile}, matmul_flops=1e9, peak_flops=1e12)
    assert table.count("matmul") == 2 and "% peak" in table


def test_torch_op_names_are_classified():
    assert [torch_category(op) for op in ("aten::addmm", "aten::bmm", "aten::index_add_",
                                          "aten::topk", "aten::copy_", "aten::silu")] == [
        "matmul", "matmul", "gather/scatter", "sort/top-k", "copy/layout", "elementwise"]
