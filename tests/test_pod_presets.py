"""Every experiment's pod preset: its arms at ~100M-1B parameters, built from the same arm
names, planned on its TPU slice (estimates here; CI's ``make plan-pods`` compiles them),
``--pod`` and ``--set`` reaching every arm's config, and arms whose steps differ only in
constants compiled once, or read from an earlier session's store."""

import json
import os
import re

import pytest

from mythos_jax.cli import main
from mythos_jax.experiments import EXPERIMENTS, get_experiment, pod
from mythos_jax.plan import memory, topology
from mythos_jax.plan.compiled import FROM_LIBTPU, FROM_STORE, CompilerFigures
from mythos_jax.train.config import train_config_fields

ROW = re.compile(r"^(\S+) +(\d+)M +(\w+) +(\S+) +([\d.]+) +([\d.]+) +(yes|NO)$", re.M)


@pytest.fixture(autouse=True)
def _restore_environment():
    """plan sets libtpu's variables for its process; keep them out of later tests."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_pod_preset_has_every_arm_at_scale_and_fits_by_estimate(name, capsys):
    """The pod arms are the CPU arms by name; each has 80M-1.2B parameters and fits its
    slice by the analytic estimate; the language-model presets read prepare-data's
    arrayrecord shards with a fixed vocabulary."""
    experiment = get_experiment(name)
    scaled = experiment.at_pod_scale()
    assert [a.name for a in scaled.arms] == [a.name for a in experiment.arms]
    assert main(["plan", "--experiment", name, "--analytic"]) == 0
    out = capsys.readouterr().out
    rows = ROW.findall(out)
    assert [r[0] for r in rows] == [a.name for a in scaled.arms]
    assert all(80 <= int(r[1]) <= 1200 and r[2] == "analytic" and r[6] == "yes" for r in rows)
    assert f"on {pod.TOPOLOGY} " in out
    fields = scaled.arm_fields(scaled.arms[0], seed=0)
    if name in ("depth_extrapolation", "position_control"):
        assert fields["data"]["source"] == "khop_graph"
    else:
        assert fields["data"]["source"] == "arrayrecord"
        assert fields["data"]["paths"] == [pod.CORPUS]
        assert fields["model"]["vocab_size"] == pod.VOCAB


def test_plan_experiment_arguments(capsys):
    """An arm's step is its own config: --seq-len and the like go with --variant only;
    --arms picks arms of one experiment, unknown ones are named; --arms, --heaviest, --jobs and
    the like without --experiment, and bad values, are one-line errors."""
    assert main(["plan", "--experiment", "stability", "--seq-len", "128"]) == 2
    assert "--seq-len: with --experiment each arm's step is its own config" in \
        capsys.readouterr().err
    assert main(["plan", "--experiment", "stability", "--arms", "free@x1,nope"]) == 2
    assert "has no arm(s) ['nope']" in capsys.readouterr().err
    assert main(["plan", "--variant", "tiny_mla", "--topology", "v4-8", "--arms", "a"]) == 2
    assert "--arms, --heaviest, --compile-budget, --jobs and --store go with --experiment" in \
        capsys.readouterr().err
    for flags, message in ((["--heaviest", "1", "--compile-budget", "5"], "exclude each other"),
                           (["--jobs", "0"], "--jobs must be >= 1, got 0"),
                           (["--compile-budget", "-1"], "--compile-budget must be >= 0")):
        assert main(["plan", "--experiment", "stability", *flags]) == 2
        assert message in capsys.readouterr().err
    assert main(["plan", "--experiment", "stability,nope", "--analytic"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["plan", "--experiment", "stability,all", "--arms", "free@x1"]) == 2
    assert "--arms goes with a single --experiment" in capsys.readouterr().err
    assert main(["plan", "--experiment", "stability", "--arms", "free@x1,parcae@x30_noclip",
                 "--analytic"]) == 0
    assert [r[0] for r in ROW.findall(capsys.readouterr().out)] == ["free@x1",
                                                                    "parcae@x30_noclip"]


def test_several_experiments_are_planned_in_one_run(tmp_path, capsys):
    """--experiment A,B: one table per experiment, every arm in the JSON with its experiment."""
    out = tmp_path / "plan.json"
    assert main(["plan", "--experiment", "depth_extrapolation,position_control", "--analytic",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count(" arms at pod scale on ") == 2
    reports = json.loads(out.read_text())
    expected = [(name, arm.name) for name in ("depth_extrapolation", "position_control")
                for arm in get_experiment(name).arms]
    assert [(r["experiment"], r["variant"]) for r in reports] == expected


def test_pod_flag_and_set_reach_every_arm(tmp_path, capsys):
    """``--pod --set data.paths=[DIR]`` builds every pod arm on a prepare-data corpus (its
    vocabulary read from the shards) and reports that none has finished."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 50)
    shards = tmp_path / "shards"
    assert main(["prepare-data", "--input", str(corpus), "--output", str(shards)]) == 0
    experiment = get_experiment("inside_the_loop").at_pod_scale().with_overrides(
        (f"data.paths=[{shards}]",))
    for arm in experiment.arms:
        cfg = experiment.arm_config(arm, False, seed=1)
        assert cfg.data.paths == (str(shards),) and cfg.model_config().vocab_size == pod.VOCAB
    capsys.readouterr()
    assert main(["experiment", "inside_the_loop", "--pod", "--set", f"data.paths=[{shards}]",
                 "--out", str(tmp_path / "out"), "--report-only"]) == 2
    assert "no finished arm to report" in capsys.readouterr().err
    with pytest.raises(SystemExit):     # argparse: --pod and --quick exclude each other
        main(["experiment", "inside_the_loop", "--pod", "--quick"])


def test_steps_that_differ_only_in_constants_compile_once(tmp_path):
    """Two learning rates give one program, compiled once (the second plan reuses the
    first's figures); a later session with the same store reads them without compiling; a
    new program with no compile allowed keeps its estimate; turning clipping off changes the
    program."""
    acc = topology.accelerator("v4-8")

    def plan(figures, *overrides, may_compile=lambda: True):
        fields = train_config_fields("tiny", ["model.attention_impl=xla", "loops.max_loops=1",
                                              "model.prelude_layers=0", "model.coda_layers=0",
                                              "data.batch_size=4", *overrides])
        return memory.plan_memory(memory.PlanSpec.of_train_config("tiny", fields), acc,
                                  "fsdp=4", compiled=figures, may_compile=may_compile)

    session = CompilerFigures(str(tmp_path))
    first, second = plan(session, "optim.lr=1e-3"), plan(session, "optim.lr=3e-2")
    assert first.method == second.method == "compiled" and first.fits
    assert first.figures_from == second.figures_from == FROM_LIBTPU
    assert first.program == second.program and len(session) == 1
    assert (second.temporaries, second.compile_seconds) == (first.temporaries,
                                                            first.compile_seconds)
    later = plan(CompilerFigures(str(tmp_path)), "optim.lr=1e-2", may_compile=lambda: False)
    assert later.figures_from == FROM_STORE and later.temporaries == first.temporaries
    assert len(os.listdir(tmp_path)) == 1
    skipped = plan(CompilerFigures(str(tmp_path)), "optim.clip_norm=0", may_compile=lambda: False)
    assert skipped.method == "analytic" and skipped.program != first.program
    assert skipped.reason == "not compiled: the compile budget was spent"
    unclipped = plan(session, "optim.clip_norm=0")
    assert unclipped.program != first.program and len(session) == 2
    assert unclipped.method == "compiled" and len(os.listdir(tmp_path)) == 2
