"""E3 (``mythos_jax/experiments/stability.py``): its grid of arms, the divergence test over the
whole trajectory, and the --quick pipeline."""

import math
import os
import types

import pytest

from mythos_jax.experiments import get_experiment, stability
from quick_runs import run_quick

NAN = math.nan


def test_the_grid_is_four_injections_four_rates_clipping_on_and_off_at_two_seeds():
    experiment = get_experiment("stability")
    assert experiment.seeds == (0, 1)
    assert [a.name for a in experiment.arms][:8] == [
        "openmythos@x1", "openmythos@x3", "openmythos@x10", "openmythos@x30",
        "openmythos@x1_noclip", "openmythos@x3_noclip", "openmythos@x10_noclip",
        "openmythos@x30_noclip"]
    assert {stability.split_name(a.name)[0] for a in experiment.arms} == {
        "openmythos", "parcae", "additive", "free"}
    assert len(experiment.arms) == 32
    for arm in experiment.arms:
        cfg = experiment.arm_config(arm, quick=False, seed=1)
        model = cfg.model_config()
        injection, setting = stability.split_name(arm.name)
        assert model.injection == injection
        assert model.prelude_norm and model.readout and model.act == "off"   # every form alike
        assert cfg.loops.schedule == "fixed" and cfg.loops.n == cfg.loops.max_loops == 8
        assert cfg.loops.backprop_depth is None                              # full backprop
        rate = int(setting.removesuffix("_noclip")[1:])
        assert cfg.optim.lr == pytest.approx(3e-3 * rate)
        assert cfg.optim.clip_norm == (0.0 if setting.endswith("_noclip") else 1.0)
        assert cfg.seed == cfg.data.seed == 1


def test_spikes_are_steps_above_twice_the_running_minimum():
    steps = [1, 2, 3, 4, 5, 6]
    assert stability.spike_steps(steps, [5.0, 2.0, 4.5, NAN, 3.9, 4.1]) == [3, 6]
    assert stability.spike_steps(steps, [5.0, 4.0, 3.0, 2.5, 2.0, 3.9]) == []


def _run(diverged=None):
    return types.SimpleNamespace(diverged=diverged)


def test_divergence_looks_at_the_whole_trajectory_not_the_last_batch():
    reasons = stability.divergence_reasons
    heldout = {"8": 2.0}
    calm, finite = [5.0] + [2.0] * 19, [True] * 20
    assert reasons(_run(), calm, finite, heldout) == []
    # a skipped non-finite step in the middle, though the last batch is fine
    assert reasons(_run(), calm, [True] * 10 + [False] + [True] * 9, heldout) == [
        "1 non-finite step(s)"]
    # a spike that recovers is counted, not a divergence; ending in one is
    assert reasons(_run(), [5.0] + [2.0] * 9 + [9.0] + [2.0] * 9, finite, heldout) == []
    assert reasons(_run(), [5.0] + [2.0] * 17 + [4.5, 4.5], finite, heldout) == [
        "ended above 2x its lowest loss"]
    assert reasons(_run("stopped"), calm, finite, None) == [
        "the trainer stopped", "held-out loss nan at 8 loops"]
    assert reasons(_run(), calm, finite, {"8": 5.5}) == ["held-out loss 5.5 at 8 loops"]


def test_stability_quick_pipeline_runs_its_quick_arms(tmp_path):
    results = run_quick("stability", tmp_path)
    quick = list(get_experiment("stability").quick_arms)
    assert list(results["arms"]) == quick and list(results["seeds"]) == ["0"]
    for arm in results["arms"].values():
        assert isinstance(arm["diverged"], bool) and isinstance(arm["rho_crossed_1"], bool)
        assert arm["diverged"] == bool(arm["diverged_because"])
        assert arm["spikes"] == len(arm["spike_steps"]) and arm["max_rho"] > 0
        assert arm["trajectory"]["step"] == [1, 2, 3, 4]
        assert len(arm["trajectory"]["rho_A"]) == len(arm["trajectory"]["state_rms"]) == 4
        assert list(arm["heldout"]) == ["8", "16"] and len(arm["state_rms_by_loop"]) == 16
    free = results["arms"]["free@x30_noclip"]
    assert free["config"]["optim"]["clip_norm"] == 0.0
    assert free["config"]["optim"]["lr"] == pytest.approx(0.09)
    assert free["config"]["model"]["injection"] == "free"
    assert [t["claim"] for t in results["targets"]][0].startswith("the unstable baseline")
    for figure in ("trajectories.png", "rho.png", "state_by_loop.png"):
        assert os.path.getsize(tmp_path / figure) > 1000
