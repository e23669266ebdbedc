"""The experiment harness: every experiment's --quick pipeline (arms trained by the trainer,
sweeps run, files written), skip and resume of arms, the L(T) fit and the README tables."""

import json
import os
import re

import numpy as np
import pytest

from mythos_jax.experiments import get_experiment, harness
from mythos_jax.experiments.fit import fit_saturating_exponential
from mythos_jax.train import trainer
from mythos_jax.train.config import TrainConfig
from quick_runs import run_quick


def test_depth_extrapolation_quick_pipeline_resumes_and_skips_arms(tmp_path, capsys):
    """E1 --quick at two seeds with its single_loop arm interrupted at step 2 beforehand (seed
    0): that arm resumes, every arm is evaluated at both seeds and the tables show the spread;
    a rerun skips the finished arm without rewriting it. Then E1b --quick in the folder beside
    it: its looped_random is E1's (the same config), taken; its shifted control trains."""
    tmp_path = tmp_path / "depth_extrapolation"
    tmp_path.mkdir()
    experiment = get_experiment("depth_extrapolation")
    single = next(a for a in experiment.arms if a.name == "single_loop")
    single_dir = harness.arm_workdir(str(tmp_path), "single_loop", 0)
    trainer.train(experiment.arm_config(single, quick=True, seed=0), single_dir, stop_after=2)
    capsys.readouterr()
    results = run_quick("depth_extrapolation", tmp_path, "--seeds", "0,1")
    assert f"resumed from {single_dir}/checkpoints at step 2\n" in capsys.readouterr().out
    assert results["seeds_run"] == [0, 1] and set(results["seeds"]) == {"0", "1"}
    arms = results["arms"]
    assert list(arms) == ["looped_random", "single_loop"]          # its quick arms
    assert [a.name for a in experiment.arms] == [
        "looped_random", "looped_fixed", "single_loop", "iso_depth_stack", "iso_flop_stack"]
    for arm in experiment.arms:                   # the other arms' configs are valid as well
        experiment.arm_config(arm, quick=True, seed=0).model_config()
    assert results["train_max_hops"] == 4
    for seed in ("0", "1"):
        for arm in results["seeds"][seed]["arms"].values():
            assert list(arm["accuracy"]) == ["2", "5"]
            assert all(list(row) == ["1", "3"] for row in arm["accuracy"].values())
            assert all(0 <= v <= 1 for row in arm["accuracy"].values() for v in row.values())
            assert arm["steps"] == 4 and arm["params"] > 0 and arm["flops_per_token"] > 0
            assert arm["commit"] == harness.source_commit()       # the code that trained it
            assert arm["commit"] is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", arm["commit"])
        assert results["seeds"][seed]["arms"]["single_loop"]["train_mean_loops"] == 1.0
        # the seed moves the init, not the graph: the same eval queries, other parameters
        assert results["seeds"][seed]["arms"]["looped_random"]["config"]["data"][
            "khop_graph_seed"] == 0
    assert set(results["exits"]) == {"looped_random"}
    for rule in ("kl", "kl_entropy"):
        exits = results["exits"]["looped_random"][rule]
        assert exits["max_loops"] == 3 and set(exits["per_hops"]) == {"2", "5"}
        assert all(1 <= v["mean_exit"] <= 3 for v in exits["per_hops"].values())
    assert len(results["targets"]) == 2 and all(isinstance(t["met"], bool)
                                                for t in results["targets"])
    assert "(min-max)" in results["table"]
    assert os.path.getsize(tmp_path / "accuracy.png") > 1000

    result_file = tmp_path / "arms" / "single_loop" / "seed-0" / harness.RESULT_FILE
    assert json.loads(result_file.read_text())["steps"] == 4
    written = result_file.stat().st_mtime_ns
    run_quick("depth_extrapolation", tmp_path, "--arms", "single_loop")
    assert "single_loop: done earlier" in capsys.readouterr().out
    assert result_file.stat().st_mtime_ns == written

    e1b = run_quick("position_control", tmp_path.parent / "position_control")
    assert "position_control/looped_random: depth_extrapolation's, the same config" in (
        capsys.readouterr().out)
    assert list(e1b["arms"]) == ["looped_random", "looped_fixed_shifted"]
    taken = dict(e1b["arms"]["looped_random"])
    assert taken.pop("taken_from") == "depth_extrapolation"
    assert taken == results["seeds"]["0"]["arms"]["looped_random"]
    assert e1b["taken_wall_s"] == taken["wall_s"]
    shifted = e1b["arms"]["looped_fixed_shifted"]
    assert e1b["wall_s"] == shifted["wall_s"]            # E1's run is not counted as E1b's
    assert shifted["steps"] == 4 and shifted["config"]["data"]["khop_train_shift"] == 8
    assert set(e1b["exits"]) == {"looped_random", "looped_fixed_shifted"}
    assert e1b["targets"] == [] and "**Position control**" not in e1b["table"]   # no 6-8 hops


@pytest.mark.parametrize("pod", [False, True], ids=["cpu", "pod"])
def test_e1_controls_are_matched_on_what_their_names_say(pod):
    """At CPU and at pod scale: iso_flop_stack has the forward FLOPs per token of
    looped_fixed within 5% (flop_count), iso_depth_stack its number of block applications."""
    from mythos_jax.experiments import depth_extrapolation as e1
    experiment = get_experiment("depth_extrapolation")
    experiment = experiment.at_pod_scale() if pod else experiment
    arms = {arm.name: arm for arm in experiment.arms}

    def flops(name, n_loops):
        return e1.forward_flops(experiment.arm_config(arms[name], False, 0), n_loops)

    looped = flops("looped_fixed", e1.FIXED_LOOPS)
    assert abs(flops("iso_flop_stack", 1) / looped - 1) < 0.05
    assert flops("iso_depth_stack", 1) < 0.7 * looped
    depth = experiment.arm_config(arms["iso_depth_stack"], False, 0).model_config()
    assert depth.prelude_layers + 1 + depth.coda_layers == 1 + e1.FIXED_LOOPS + 1


@pytest.mark.parametrize("pod", [False, True], ids=["cpu", "pod"])
def test_position_controls_differ_from_their_e1_arm_in_one_field(pod):
    """At CPU and at pod scale: E1b's reference arms are E1's, config for config (so their
    runs are the same); looped_random_slots differs from looped_random in its query slots
    only, looped_fixed_shifted and the shifted stacks from looped_fixed and E1's stacks in
    data.khop_train_shift only, the others from looped_fixed in model.positions or
    model.rope_theta only."""
    from mythos_jax.experiments import position_control as e1b
    e1, experiment = (get_experiment(name) for name in ("depth_extrapolation",
                                                         "position_control"))
    if pod:
        e1, experiment = e1.at_pod_scale(), experiment.at_pod_scale()
    arms = {arm.name: arm for arm in experiment.arms}

    def config(name):
        return experiment.arm_config(arms[name], False, 0).to_dict()

    reference = {arm.name: arm for arm in e1.arms}
    for seed in e1.seeds:
        for name in e1b.POSITION_CONTROLS:
            assert experiment.arm_config(arms[name], False, seed) == \
                e1.arm_config(reference[name], False, seed)
    random, slots = config("looped_random"), config("looped_random_slots")
    assert slots["data"].pop("khop_query_slots") == e1b.QUERY_SLOTS
    random["data"].pop("khop_query_slots")
    assert random == slots
    fixed = config("looped_fixed")
    e1_arms = {arm.name: arm for arm in e1.arms}
    for name, reference_config in (("looped_fixed", fixed),
                                   ("iso_depth_stack", None), ("iso_flop_stack", None)):
        reference_config = reference_config or e1.arm_config(e1_arms[name], False, 0).to_dict()
        shifted = config(f"{name}_shifted")
        assert shifted["data"].pop("khop_train_shift") == e1b.TRAIN_SHIFT
        assert reference_config["data"]["khop_train_shift"] == 0
        reference_config["data"].pop("khop_train_shift")
        assert shifted == reference_config
    fixed = config("looped_fixed")
    for positions in ("nope_loop", "nope"):
        nope = config(f"looped_fixed_{positions}")
        assert nope["model"].pop("positions") == positions
        assert nope == fixed
    unaliased = config("looped_fixed_theta20")
    assert unaliased["model"].pop("rope_theta") == e1b.UNALIASED_THETA
    assert unaliased == fixed


def test_position_control_states_the_rule_and_its_verdict_per_control():
    """Per seed, looped_fixed answers 6-8 hops at 30%; nope_loop at 45% (+15 points) in
    every seed: position; nope +15 in one seed only: mixed; theta20 +2: depth (the only
    target met); looped_random_slots never learns the trained hops: says nothing."""
    from mythos_jax.experiments import position_control as e1b

    def arm(trained: float, beyond: float) -> dict:
        return {"accuracy": {str(k): {"1": 0.0, "32": trained if k <= 4 else beyond}
                             for k in range(1, 9)}}

    seeds = {str(seed): {"arms": {
        "looped_random": arm(0.95, 0.2), "looped_random_slots": arm(0.3, 0.05),
        "looped_fixed": arm(0.97, 0.3), "looped_fixed_nope_loop": arm(0.96, 0.45),
        "looped_fixed_nope": arm(0.96, 0.45 if seed == 0 else 0.35),
        "looped_fixed_theta20": arm(0.96, 0.32)}} for seed in range(3)}
    results = {"seeds": seeds, "arms": seeds["0"]["arms"]}
    lines = e1b._position_control(results)
    assert "at least 10 points better" in lines[1]
    assert lines[-4:] == [
        "- looped_random_slots against looped_random at 6-8 hops: says nothing (it does not "
        "learn the trained hops) (gain per seed -15.0, -15.0, -15.0 points)",
        "- looped_fixed_nope_loop against looped_fixed at 6-8 hops: position: the collapse was "
        "(partly) one of position (gain per seed +15.0, +15.0, +15.0 points)",
        "- looped_fixed_nope against looped_fixed at 6-8 hops: mixed: better by that much in "
        "some seeds only (gain per seed +15.0, +5.0, +5.0 points)",
        "- looped_fixed_theta20 against looped_fixed at 6-8 hops: depth: no better without "
        "those positions (gain per seed +2.0, +2.0, +2.0 points)"]
    assert lines[7].startswith("| looped_fixed | 30.0% (30.0%-30.0%) |")
    assert [t["met"] for t in e1b._targets(results)] == [False, False, False, True]
    assert e1b._position_control({"seeds": {}, "arms": {"looped_fixed": arm(1, 1)}}) == []


def test_the_shifted_arm_is_held_to_e1s_targets_against_its_own_stacks():
    """looped_fixed_shifted answers 8 hops at 95% and 5-8 hops at 80% in every seed, the
    shifted stacks 5-8 hops at 40% and 85% in one seed: 2 K met, the stacks not beaten."""
    from mythos_jax.experiments import position_control as e1b

    def arm(beyond: float) -> dict:
        return {"accuracy": {str(k): {"1": 0.0, "8": 1.0 if k <= 4 else beyond}
                             for k in range(1, 9)}}

    seeds = {str(seed): {"arms": {"looped_fixed_shifted": arm(0.95 if seed else 0.8),
                                  "iso_depth_stack_shifted": arm(0.4),
                                  "iso_flop_stack_shifted": arm(0.85 if seed == 2 else 0.4)}}
             for seed in range(3)}
    results = {"seeds": seeds, "arms": seeds["0"]["arms"]}
    double, stacks = e1b._shifted_targets(results)
    assert double["claim"].startswith("looped_fixed_shifted: >= 90% at 8 hops")
    assert not double["met"] and double["ours"].startswith("90.0% (80.0%-95.0%)")
    assert stacks["claim"].startswith("looped_fixed_shifted beats iso_depth_stack_shifted and "
                                      "iso_flop_stack_shifted beyond training (5..8 hops")
    assert not stacks["met"] and "iso_flop_stack_shifted 55.0% (40.0%-85.0%)" in stacks["ours"]
    del seeds["2"]
    assert [t["met"] for t in e1b._shifted_targets(results)] == [False, True]
    results["arms"] = {"looped_fixed": arm(0.5)}
    assert e1b._shifted_targets(results) == []


def test_a_finished_arm_counts_for_its_config_with_fields_added_since(tmp_path):
    """A result.json written before a config field existed is that arm's result when the field
    holds its default; another value, a removed field or a bad value is not."""
    experiment = get_experiment("position_control")
    arm = next(a for a in experiment.arms if a.name == "looped_fixed")
    cfg = experiment.arm_config(arm, quick=False, seed=0)
    path = tmp_path / harness.RESULT_FILE

    def reused(edit) -> bool:
        written = cfg.to_dict()
        edit(written["data"])
        path.write_text(json.dumps({"config": written, "wall_s": 1.0}))
        return harness._read_result(str(path), cfg) is not None

    assert reused(lambda data: None)
    assert reused(lambda data: data.pop("khop_train_shift"))          # written before it existed
    assert not reused(lambda data: data.update(khop_train_shift=2))
    assert not reused(lambda data: data.update(khop_window=3))        # a field since removed
    assert not reused(lambda data: data.update(batch_size=-1))


def test_optional_arms_are_left_out_of_a_full_run_and_reported_when_finished(tmp_path):
    """A full run trains every arm but the optional ones; an optional arm that has finished
    (trained with --arms) joins the report in the experiment's order, its wall time apart."""
    e1b = get_experiment("position_control")
    assert [a.name for a in e1b.chosen_arms(None)] == [
        a.name for a in e1b.arms if a.name not in e1b.optional_arms]
    assert set(e1b.optional_arms) < {a.name for a in e1b.arms}
    arms = tuple(harness.Arm(name, (f"optim.lr={lr}",)) for name, lr in
                 (("a", 0.001), ("b", 0.002), ("c", 0.003)))
    experiment = harness.Experiment(
        name="toy", claim="", base="tiny", base_overrides=(), quick_overrides=(), arms=arms,
        evaluate=None, report=lambda results, out: "table", optional_arms=("b",))
    assert [a.name for a in experiment.chosen_arms(None)] == ["a", "c"]

    def finish(arm, wall_s):
        cfg = experiment.arm_config(arm, quick=False, seed=0)
        workdir = harness.arm_workdir(str(tmp_path), arm.name, 0)
        os.makedirs(workdir)
        with open(os.path.join(workdir, harness.RESULT_FILE), "w") as f:
            json.dump({"config": cfg.to_dict(), "wall_s": wall_s}, f)

    finish(arms[0], 60.0)
    finish(arms[2], 120.0)
    results = harness.run(experiment, str(tmp_path), report_only=True)
    assert list(results["arms"]) == ["a", "c"] and results["unfinished"] == []
    assert results["wall_s"] == 180.0 and results["optional_wall_s"] == 0
    finish(arms[1], 30.0)
    results = harness.run(experiment, str(tmp_path), report_only=True)
    assert list(results["arms"]) == ["a", "b", "c"]
    assert results["wall_s"] == 180.0 and results["optional_wall_s"] == 30.0
    assert "wall 3.0 min (not counted: the optional arms 0.5 min)" in "\n".join(
        harness.report_head(results, []))


def test_the_exit_sweep_reads_every_query_at_its_own_answer():
    """E1's exit sweep runs every hop count as one batch of full-length rows: each row's length
    ends at its answer, the one scored token, and its answer is that position's target."""
    from mythos_jax.experiments.depth_extrapolation import _answer_queries
    from mythos_jax.train import data as data_lib
    e1 = get_experiment("depth_extrapolation")
    cfg = e1.arm_config(e1.arms[0], quick=False, seed=0)
    for hops in (1, 4, 12):
        split = f"hops={hops}"
        ids, lengths, answers = _answer_queries(cfg, split)
        batches = data_lib.eval_batches(cfg.data, split)[:cfg.eval.batches]
        mask = np.concatenate([b["loss_mask"] for b in batches])
        targets = np.concatenate([b["targets"] for b in batches])
        assert len(ids) == len(mask) == cfg.eval.batches * cfg.data.batch_size
        np.testing.assert_array_equal(ids, np.concatenate([b["inputs"] for b in batches]))
        np.testing.assert_array_equal(lengths, hops + 1)    # the entity and its relations
        rows = np.arange(len(ids))
        assert (mask[rows, lengths - 1] > 0).all() and (mask.sum(axis=1) == 1).all()
        np.testing.assert_array_equal(answers, targets[rows, lengths - 1])


def test_e1_exit_is_compared_with_the_cheapest_fixed_budget_as_accurate():
    from mythos_jax.experiments.depth_extrapolation import exit_against_fixed
    arm = {"accuracy": {"1": {"1": 0.5, "2": 0.9, "4": 1.0}, "2": {"1": 0.1, "2": 0.7, "4": 0.9}},
           "exits": {"kl": {"mean_exit": 1.5, "accuracy": 0.81,
                            "per_hops": {"1": {}, "2": {}}}}}
    check = exit_against_fixed(arm, "kl")       # budget 2 reaches 0.80 >= 0.81 - 0.01
    assert check["fixed_budget"] == 2 and check["saving"] == pytest.approx(0.25)
    arm["exits"]["kl"]["accuracy"] = 0.99
    assert exit_against_fixed(arm, "kl")["fixed_budget"] is None


def test_test_time_depth_quick_pipeline_runs_its_quick_arms(tmp_path):
    results = run_quick("test_time_depth", tmp_path)
    assert list(results["arms"]) == ["parcae_random", "non_looped"]
    for arm in results["arms"].values():
        assert list(arm["loss"]) == ["1", "2", "4", "8"]
        assert set(arm["fit"]) == {"L_inf", "Z", "z", "r2"}
        assert np.isfinite(list(arm["loss"].values())).all()
    parcae = results["arms"]["parcae_random"]["config"]
    assert parcae["model"]["injection"] == "parcae" and parcae["model"]["act"] == "off"
    assert parcae["loops"]["schedule"] == "poisson" and parcae["loops"]["per_sequence"]
    assert parcae["loops"]["backprop_depth"] == 2                    # ceil(mu / 2), Parcae
    baseline = results["arms"]["non_looped"]["config"]
    assert baseline["loops"] == {"schedule": "fixed", "n": 1, "max_loops": 1,
                                 "backprop_depth": None, "per_sequence": False}
    same_model = TrainConfig.from_dict(parcae).model_config().replace(
        injection="openmythos", prelude_norm=False, readout=False)
    assert TrainConfig.from_dict(baseline).model_config() == same_model
    assert any(t["claim"].startswith("parcae_random: below the non-looped model")
               for t in results["targets"])
    assert os.path.getsize(tmp_path / "loss_by_loops.png") > 1000


def test_the_khop_preset_is_the_looped_random_arm():
    from mythos_jax.train.config import load_train_config

    arm = get_experiment("depth_extrapolation").arms[0]
    assert arm.name == "looped_random"
    experiment_cfg = get_experiment("depth_extrapolation").arm_config(arm, False, 0)
    preset = load_train_config("khop")
    assert preset.loops.build() == experiment_cfg.loops.build()       # the same depth sampler
    for section in ("steps", "model", "data", "optim", "checkpoint", "eval"):
        assert preset.to_dict()[section] == experiment_cfg.to_dict()[section], section


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown experiment 'e4'"):
        get_experiment("e4")
    with pytest.raises(ValueError, match=r"has no arm\(s\) \['nope'\]"):
        harness.run(get_experiment("stability"), "/nonexistent", arms=["nope"])


def test_fit_recovers_a_saturating_exponential():
    loops = np.array([1, 2, 3, 4, 6, 8, 12, 16, 24, 32])
    fit = fit_saturating_exponential(loops, 1.3 + 0.7 * np.exp(-0.45 * loops))
    assert fit["L_inf"] == pytest.approx(1.3, abs=1e-4)
    assert fit["Z"] == pytest.approx(0.7, rel=1e-3)
    assert fit["z"] == pytest.approx(0.45, rel=1e-3)
    assert fit["r2"] > 0.99999
    v_shape = fit_saturating_exponential(loops, 1.0 + 0.05 * (np.log2(loops) - 3) ** 2)
    assert v_shape["r2"] < 0.9
    with pytest.raises(ValueError, match="need >= 3 points"):
        fit_saturating_exponential([1, 2], [1.0, 0.5])
    with pytest.raises(ValueError, match="must be finite"):
        fit_saturating_exponential([1, 2, 3], [1.0, float("nan"), 0.5])


def test_include_in_readme_replaces_only_its_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:e1 -->\nold\n<!-- /results:e1 -->\n"
                      "<!-- results:e2 -->\nkeep\n<!-- /results:e2 -->\n")
    harness.include_in_readme(str(readme), "e1", "| new | table |")
    assert readme.read_text() == ("intro\n<!-- results:e1 -->\n| new | table |\n"
                                  "<!-- /results:e1 -->\n<!-- results:e2 -->\nkeep\n"
                                  "<!-- /results:e2 -->\n")
    with pytest.raises(ValueError, match="no <!-- results:e3 -->"):
        harness.include_in_readme(str(readme), "e3", "x")


def test_a_preempted_arm_stops_the_experiment_with_the_preemption_code(tmp_path, monkeypatch,
                                                                     capsys):
    """SIGTERM during an arm: the trainer saved and reports ``preempted``; the experiment
    reports nothing for that arm, says how to resume and exits with PREEMPTED_EXIT."""
    from mythos_jax.cli import main
    monkeypatch.setattr(trainer, "train", lambda cfg, workdir: {"step": 3, "preempted": True})
    assert main(["experiment", "stability", "--quick", "--out", str(tmp_path)]) == \
        trainer.PREEMPTED_EXIT
    assert "stopped at step 3: rerun the same command to resume" in capsys.readouterr().out
    assert not (tmp_path / "results.json").exists()
