"""mythos_jax.train.config, loop_config, data_config: a section class per schedule and per data
source, from YAML and ``--set``, with one-line errors and exact ``to_dict`` round trips."""

import dataclasses
import json
import re
import types
from pathlib import Path

import jax.numpy as jnp
import pytest

from mythos_jax import schedules
from mythos_jax.experiments import EXPERIMENTS, get_experiment
from mythos_jax.modes import ScheduleKind
from mythos_jax.train.config import PRESETS, TrainConfig, load_train_config
from mythos_jax.train.data_config import KhopGraphData, StdlibData
from mythos_jax.train.loop_config import (CurriculumLoops, FixedLoops, LogNormalPoissonLoops,
                                          LoopsConfig, PoissonLoops)


def test_every_schedule_kind_has_its_section():
    assert set(LoopsConfig.kinds) == set(ScheduleKind.names())


CURRICULUM_YAML = """\
data: {seq_len: 32}
loops:
  schedule: curriculum
  start_mean: 2
  ramp_steps: 500
  shape: sqrt
  target: {schedule: lognormal_poisson, mean: 6, sigma: 0.3, max_loops: 12, backprop_depth: 4}
"""
CURRICULUM_SET = ["data.seq_len=32", "loops.schedule=curriculum", "loops.start_mean=2",
                  "loops.ramp_steps=500", "loops.shape=sqrt",
                  "loops.target.schedule=lognormal_poisson", "loops.target.mean=6",
                  "loops.target.sigma=0.3", "loops.target.max_loops=12",
                  "loops.target.backprop_depth=4"]


def test_a_curriculum_over_lognormal_poisson_from_yaml_and_from_set(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(CURRICULUM_YAML)
    from_file, from_set = load_train_config(str(path)), load_train_config(None, CURRICULUM_SET)
    assert from_file == from_set and isinstance(from_file.loops, CurriculumLoops)
    target = schedules.LogNormalPoisson(mean=6.0, sigma=0.3, max_loops=12,
                                        backprop_depth=4)
    assert from_file.loops.build() == schedules.Curriculum(target=target, start_mean=2.0,
                                                           ramp_steps=500, shape="sqrt")
    assert (from_file.loops.max_loops, from_file.loops.backprop_depth) == (12, 4)
    assert not from_file.loops.build().loop_spec(jnp.int32(3)).static
    assert from_file.to_dict()["loops"]["target"]["schedule"] == "lognormal_poisson"


@pytest.mark.parametrize("overrides, message", [
    (["loops.schedule=poisson", "loops.sigma=1"],
     "loops.sigma: not a field of the 'poisson' schedule"),
    (["loops.mean=6"], "loops.mean: not a field of the 'uniform' schedule"),   # tiny: uniform
    (["loops.schedule=curriculum", "loops.target.n=3"],
     "loops.target.n: not a field of the 'poisson' schedule"),
    (["loops.schedule=curriculum", "loops.target.schedule=fixed"],
     "TrainConfig.loops.target.schedule: a curriculum ramps a poisson or lognormal_poisson"),
    (["loops.schedule=geometric"], "loops.schedule: must be one of ['fixed', 'uniform'"),
    (["data.khop_relations=3"], "data.khop_relations: not a field of the 'stdlib' source"),
    (["data.source=khop", "data.khop_heldout=0.2", "model.max_seq_len=128", "data.seq_len=128"],
     "data.khop_heldout: not a field of the 'khop' source"),
])
def test_a_field_of_another_kind_is_a_one_line_error_naming_it(overrides, message):
    with pytest.raises(ValueError) as err:
        load_train_config("tiny", overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value), err.value


def test_changing_a_kind_drops_the_fields_the_new_kind_lacks():
    """tiny's loops are uniform (lo, hi), its data stdlib: a new kind keeps the shared fields."""
    cfg = load_train_config("tiny", ["loops.schedule=poisson", "loops.mean=6",
                                     "data.source=khop_graph", "data.khop_relations=3",
                                     "data.seq_len=16"])
    assert cfg.loops == PoissonLoops(mean=6.0, max_loops=3)
    assert cfg.data == KhopGraphData(seq_len=16, batch_size=8, khop_relations=3)
    fixed = load_train_config("cpu_small", ["loops.schedule=fixed", "loops.n=2"]).loops
    assert fixed == FixedLoops(n=2, max_loops=6, backprop_depth=3) and fixed.build().n == 2
    same = load_train_config("cpu_small", ["loops.schedule=poisson", "loops.max_loops=4"])
    assert same.loops == PoissonLoops(mean=3.0, max_loops=4, backprop_depth=3)


def test_defaults_are_poisson_loops_over_the_stdlib():
    cfg = load_train_config(None, ["data.seq_len=32"])
    assert cfg.loops == PoissonLoops() and cfg.data == StdlibData(seq_len=32)
    curriculum = load_train_config("tiny", ["loops.schedule=curriculum"]).loops
    assert curriculum == CurriculumLoops(target=PoissonLoops())
    lognormal = load_train_config("tiny", ["loops.schedule=lognormal_poisson"]).loops
    assert lognormal == LogNormalPoissonLoops(max_loops=3)


def test_a_schedules_mean_is_mean_in_yaml_and_python():
    """One name per meaning (issue 26): ``loops.mean`` builds ``Poisson(mean=...)``; the old
    Python name ``mean_loops`` is refused in both, in one line naming it (YAML: and the
    schedule's fields)."""
    built = load_train_config("tiny", ["loops.schedule=poisson", "loops.mean=5"]).loops.build()
    assert built == schedules.Poisson(mean=5.0, max_loops=3) and built.mean == 5.0
    assert schedules.LogNormalPoisson(mean=6.0, sigma=0.3).mean == 6.0
    with pytest.raises(ValueError) as err:
        load_train_config("tiny", ["loops.schedule=poisson", "loops.mean_loops=5"])
    assert str(err.value) == ("loops.mean_loops: not a field of the 'poisson' schedule (its "
                              "fields: backprop_depth, max_loops, mean, per_sequence)")
    with pytest.raises(TypeError, match="mean_loops"):
        schedules.Poisson(mean_loops=5.0)


def readme_section_table() -> dict[str, tuple[str, str]]:
    """The README Training section's table of config sections: name -> (what, defaults)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = text[text.index("| section | what | defaults |"):].splitlines()
    rows = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        name, what, defaults = (cell.strip() for cell in line.strip("|").split("|"))
        rows[name.strip("`")] = (what, defaults)
    return rows


def test_the_readme_section_table_gives_the_defaults():
    """Every section of TrainConfig has its row, and each row's defaults (and the AdamW and
    eval.every figures in its text) are TrainConfig's field defaults. (TrainConfig() itself
    does not build: tiny_mla's max_seq_len 64 is shorter than the default data.seq_len 128.)"""
    rows = readme_section_table()
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    default = types.SimpleNamespace(**{
        f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
        for f in dataclasses.fields(TrainConfig)})
    top = [name for name in fields if not isinstance(getattr(default, name), dict)
           and not dataclasses.is_dataclass(getattr(default, name))]
    assert set(rows) == {"top level"} | (set(fields) - set(top))
    assert re.findall(r"`(\w+)`", re.sub(r"\(.*?\)", "", rows["top level"][0])) == top
    assert rows["top level"][1].replace("`", "").split(", ") == [
        str(getattr(default, name)) for name in top]
    assert rows["model"][1] == f"`{default.model['variant']}`"
    source, seq_len, batch = re.fullmatch(r"(\w+), (\d+) x (\d+)", rows["data"][1]).groups()
    assert (source, int(seq_len), int(batch)) == (
        default.data.source, default.data.seq_len, default.data.batch_size)
    schedule, mean, max_loops = re.fullmatch(r"(\w+), mean ([\d.]+), max (\d+)",
                                             rows["loops"][1]).groups()
    assert (schedule, float(mean), int(max_loops)) == (
        str(default.loops.schedule), default.loops.mean, default.loops.max_loops)
    optim = default.optim
    assert float(re.fullmatch(r"lr (\S+)", rows["optim"][1]).group(1)) == optim.lr
    adamw = re.search(r"AdamW \(b1 (\S+), b2 (\S+), wd (\S+) on matrices", rows["optim"][0])
    assert tuple(map(float, adamw.groups())) == (optim.b1, optim.b2, optim.weight_decay)
    assert rows["checkpoint"][1].split(", ") == [str(default.checkpoint.every),
                                                 str(default.checkpoint.keep)]
    assert rows["log"][1] == str(default.log.every)
    assert tuple(map(int, rows["eval"][1].split(", "))) == default.eval.loops
    every = re.search(r"`every` \((\d+): at the end only\)", rows["eval"][0]).group(1)
    assert int(every) == default.eval.every


def preset_configs():
    """Every preset that builds without files, and every experiment arm."""
    for name in PRESETS:
        if PRESETS[name]["data"]["source"] != "arrayrecord":
            yield pytest.param(load_train_config(name), id=name)
    for experiment in map(get_experiment, EXPERIMENTS):
        for arm in experiment.arms:
            yield pytest.param(experiment.arm_config(arm, False, 0),
                               id=f"{experiment.name}/{arm.name}")


@pytest.mark.parametrize("cfg", list(preset_configs()))
def test_to_dict_round_trips(cfg):
    plain = json.loads(cfg.to_json())
    assert TrainConfig.from_dict(plain) == cfg
    assert TrainConfig.from_dict(plain).to_dict() == cfg.to_dict()
    assert plain["loops"]["schedule"] in ScheduleKind.names()
    assert plain["data"]["source"] == cfg.data.source
