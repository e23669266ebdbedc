"""E4 looped_vs_standard: its arms matched on what their names say, the effective depth and
gap-closed arithmetic, and the --quick pipeline (the issue's results.json layout)."""

import math
import os

import pytest

from mythos_jax import flop_count
from mythos_jax.experiments import get_experiment
from mythos_jax.experiments import looped_vs_standard as e4
from quick_runs import run_quick


def _model(name):
    experiment = get_experiment("looped_vs_standard")
    arm = next(a for a in experiment.arms if a.name == name)
    return experiment.arm_config(arm, False, 0)


def test_looped_arms_are_iso_parameter_with_3_layers_and_iso_flop_with_6():
    """The looped model has exactly standard_3's blocks (its parameters, by construction), and
    at its mean training loops the forward FLOPs of standard_6 within 3%; every block has the
    same FFN width (one routed expert of the dense width, no shared expert)."""
    looped, three, six = (_model(n) for n in ("looped_lti", e4.ISO_PARAM, e4.TWICE_PARAMS))
    assert looped.model_config() == three.model_config()
    cfg = looped.model_config()
    assert cfg.expert_dim == cfg.dense_hidden and cfg.n_shared_experts == 0
    assert (cfg.n_experts, cfg.n_experts_per_tok) == (1, 1)
    seq = looped.data.seq_len
    at_mu = flop_count.flops(cfg, seq, e4.MEAN_LOOPS)["forward"]
    assert abs(at_mu / flop_count.flops(six.model_config(), seq, 1)["forward"] - 1) < 0.03
    assert looped.loops.build().backprop_depth == math.ceil(e4.MEAN_LOOPS / 2)
    assert looped.loops.per_sequence
    for n in e4.UNIQUE_LAYERS:
        model = _model(f"standard_{n}").model_config()
        assert model.prelude_layers + 1 + model.coda_layers == n


def test_effective_depth_and_gap_closed():
    standard = {2: 3.0, 3: 2.5, 6: 2.0, 8: 1.9}
    assert e4.effective_depth(2.5, standard) == pytest.approx(3.0)
    assert e4.effective_depth(2.25, standard) == pytest.approx(math.sqrt(18))   # log-midpoint
    assert e4.effective_depth(1.8, standard) == math.inf
    assert e4.effective_depth(3.1, standard) == -math.inf
    assert e4.gap_closed(2.0625, 2.5, 2.0) == pytest.approx(0.875)


def test_quick_pipeline_writes_the_issue_layout(tmp_path):
    results = run_quick("looped_vs_standard", tmp_path)
    arms = results["arms"]
    assert list(arms) == [e4.ISO_PARAM, e4.TWICE_PARAMS, "looped_lti"]
    assert arms["looped_lti"]["unique_layers"] is None and arms["looped_lti"]["mean_loops"] > 1
    assert arms[e4.ISO_PARAM]["unique_layers"] == 3 and arms[e4.ISO_PARAM]["mean_loops"] is None
    assert arms["looped_lti"]["params"] == arms[e4.ISO_PARAM]["params"]
    assert arms[e4.TWICE_PARAMS]["params"] > 1.7 * arms[e4.ISO_PARAM]["params"]
    for arm in arms.values():
        assert arm["flops_per_token"] > 0 and set(arm["loss"]) == {"0"}
    assert list(arms["looped_lti"]["loss"]["0"]) == [str(t) for t in e4.TEST_LOOPS]
    assert list(arms[e4.ISO_PARAM]["loss"]["0"]) == ["1"]
    assert set(results["gap_closed"]) == {"looped_lti"}
    assert math.isfinite(results["gap_closed"]["looped_lti"])
    assert os.path.getsize(tmp_path / "loss_vs_size.png") > 1000
