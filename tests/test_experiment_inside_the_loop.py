"""E5 inside_the_loop: the --quick pipeline with the routing per loop iteration, the arms'
matching (parameters, active parameters, FLOPs) and the routing statistics themselves."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mythos_jax import variants
from mythos_jax.experiments import get_experiment, routing
from mythos_jax.experiments.inside_the_loop import TRAIN_LOOPS, parameter_counts
from mythos_jax.flop_count import forward_flops_per_token
from mythos_jax.model import OpenMythos
from quick_runs import run_quick


def test_quick_pipeline_reports_routing_at_every_loop_of_the_moe_arm(tmp_path):
    results = run_quick("inside_the_loop", tmp_path)
    assert list(results["seeds"]) == ["0"]
    arms = results["seeds"]["0"]["arms"]
    assert list(arms) == ["moe_mla"] and results["arms"] == arms
    moe = arms["moe_mla"]
    assert list(moe["loss"]) == ["1", "2", "4"] and np.isfinite(list(moe["loss"].values())).all()
    assert moe["steps"] == 6 and moe["flops_per_token"] > 0
    assert 0 < moe["active_params"] < moe["params"]

    by_loop = moe["routing"]
    assert list(by_loop) == ["1", "2", "3", "4"]
    assert by_loop["1"]["topk_changed"] is None
    for loop in by_loop.values():
        assert len(loop["load"]) == 8 and sum(loop["load"]) == pytest.approx(1.0)
        assert 1.0 <= loop["max_over_mean"] <= 8 / 2 + 1e-6             # at most E / K
        assert 2 - 1e-6 <= loop["effective_experts"] <= 8 + 1e-6      # K .. E
        assert np.isfinite(loop["z_loss"]) and loop["z_loss"] >= 0
    assert all(0.0 <= by_loop[t]["topk_changed"] <= 1.0 for t in ("2", "3", "4"))
    assert len(moe["router_bias"]) == 8
    assert set(moe["train_routing"]) == {"z_loss", "load_max_over_mean", "aux_loss"}
    assert "| top-K changed | - |" in results["table"]
    for plot in ("loss_by_loops.png", "routing_heatmap.png", "routing_by_loops.png"):
        assert os.path.getsize(tmp_path / plot) > 1000, plot


def test_report_compares_moe_with_dense_arms_paired_by_seed(tmp_path):
    """Two seeds of a MoE arm beside a dense arm without routing: the gap to the dense arm is
    per seed, the balance target reads every loop up to 2 mu, the table spans both arms."""
    def arm(loss: float, routed: bool) -> dict:
        result = {"loss": {"1": loss + 0.1, "4": loss}, "params": 10, "active_params": 5,
                  "flops_per_token": 1e6, "train_mean_loops": 4.0}
        if routed:
            result.update(routing={str(t): {"load": [0.5, 0.25, 0.25, 0.0],
                                            "max_over_mean": 2.0 if t == 8 else 1.2,
                                            "effective_experts": 2.8,
                                            "topk_changed": None if t == 1 else 0.1,
                                            "z_loss": 1.0} for t in range(1, 17)},
                          router_bias=[0.1, -0.1, 0.0, 0.0],
                          train_routing={"z_loss": 1.0, "load_max_over_mean": 1.1,
                                         "aux_loss": 1.0})
        return result

    seeds = {"0": {"arms": {"moe_mla": arm(1.5, True), "dense_active": arm(1.6, False)}},
             "1": {"arms": {"moe_mla": arm(1.7, True), "dense_active": arm(1.6, False)}}}
    results = {"seeds": seeds, "arms": seeds["0"]["arms"], "seed": 0, "seeds_run": [0, 1],
               "date": "today", "wall_s": 60.0, "command": "mythos-jax experiment E5",
               "machine": {"processor": "x", "cores": 2, "platform": "cpu", "jax": "0"}}
    table = get_experiment("inside_the_loop").report(results, str(tmp_path))
    beats, balanced = results["targets"]
    assert beats["claim"].startswith("MoE beats") and beats["met"] is False     # seed 1 loses
    assert "-6.25%" in beats["ours"] and "+6.25%" in beats["ours"]
    assert balanced == {"claim": balanced["claim"], "ours": "worst loop 2.00 (2.00-2.00)",
                        "met": False}
    assert "| dense_active | 1.7000 (1.7000-1.7000) | 1.6000 (1.6000-1.6000) |" in table
    assert os.path.getsize(tmp_path / "routing_heatmap.png") > 1000


def _sizes(arm_name: str) -> dict:
    """Parameters, active parameters and forward FLOPs per token (at the training mean) of an
    E5 arm's full-run model, from its abstract init."""
    experiment = get_experiment("inside_the_loop")
    arm = next(a for a in experiment.arms if a.name == arm_name)
    train_cfg = experiment.arm_config(arm, quick=False, seed=0)
    cfg = train_cfg.model_config()
    model = nnx.eval_shape(lambda: OpenMythos(cfg, rngs=nnx.Rngs(0)))
    flops = forward_flops_per_token(cfg, train_cfg.data.seq_len, TRAIN_LOOPS)["total"]
    return {**parameter_counts(nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg),
            "flops": flops}


def test_e5_arms_are_matched():
    """dense_active has moe_mla's active parameters and forward FLOPs, dense_total its total
    parameters (each within 1%: only the router's width differs); moe_gqa and the balancing
    arms have moe_mla's size."""
    moe = _sizes("moe_mla")
    assert moe["params"] == 367_842 and moe["active_params"] == 257_250
    dense_active, dense_total = _sizes("dense_active"), _sizes("dense_total")
    assert dense_active["params"] == pytest.approx(moe["active_params"], rel=0.01)
    assert dense_active["flops"] == pytest.approx(moe["flops"], rel=0.01)
    assert dense_total["params"] == pytest.approx(moe["params"], rel=0.01)
    assert dense_total["flops"] > 1.5 * moe["flops"]
    assert _sizes("moe_gqa")["params"] == pytest.approx(moe["params"], rel=0.01)
    for name in ("moe_fast_bias", "moe_aux"):
        assert _sizes(name) == moe


def test_routing_statistics_on_a_hand_built_example():
    """3 iterations of 4 tokens, top-2 of 4 experts: iteration 1 balanced, iteration 2 the
    same sets in another order, iteration 3 every token on experts 0 and 1."""
    expert_ids = np.array([[[0, 1], [2, 3], [0, 2], [1, 3]],
                           [[1, 0], [3, 2], [2, 0], [3, 1]],
                           [[0, 1], [0, 1], [1, 0], [0, 1]]])
    load = routing.load_by_loop(expert_ids, 4)
    np.testing.assert_allclose(load, [[0.25] * 4, [0.25] * 4, [0.5, 0.5, 0, 0]])
    np.testing.assert_allclose(routing.max_over_mean(load), [1.0, 1.0, 2.0])
    np.testing.assert_allclose(routing.effective_experts(load), [4.0, 4.0, 2.0])
    np.testing.assert_allclose(routing.topk_changed(expert_ids), [0.0, 0.75])


def test_routing_by_loop_agrees_with_the_models_own_router_statistics():
    """The load per loop from the traced top-K equals the forward's ``load_per_loop``
    (normalised), and the z-loss per loop averages to the forward's z-loss."""
    model = OpenMythos(variants.tiny_mla(), rngs=nnx.Rngs(0))
    model.eval()
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 8)))
    by_loop = routing.routing_by_loop(model, ids, 3)
    info = model(ids, 3, return_info=True).info.moe
    load = np.asarray(info.load_per_loop)[:3]
    np.testing.assert_allclose([v["load"] for v in by_loop.values()],
                               load / load.sum(axis=1, keepdims=True), atol=1e-6)
    assert np.mean([v["z_loss"] for v in by_loop.values()]) == pytest.approx(
        float(info.z_loss), rel=1e-5)
