"""The experiment harness: arms trained by ``mythos_jax.train``, evaluated, reported.

    experiment = Experiment(name, claim, base="khop", arms=(Arm("a", ("loops.n=4",)), ...),
                            evaluate=fn(run: ArmRun) -> dict, report=fn(results, out) -> md)
    results = run(experiment, out_dir, quick=False)

Each arm trains once per seed in ``<out>/arms/<arm>/seed-<seed>/`` with
``mythos_jax.train.trainer.train`` (the seed sets ``seed`` and ``data.seed``: the model init,
the loop draws and the data order; an experiment pins what must not move, such as a task's
graph, in its base overrides): checkpoints,
metrics and resume are the trainer's own, so an interrupted arm continues where it stopped and
a finished one (its ``result.json`` written for the same config) is skipped. ``--quick`` adds
the experiment's ``quick_overrides`` (a few steps, small sweeps) and runs its ``quick_arms``:
it checks the pipeline, not the science. A full run leaves out the experiment's
``optional_arms`` (its time budget); those that have finished join the report. The
experiment's ``report`` turns the collected results into a Markdown table (the claims, our
numbers, met or not) and plots; ``results.json`` holds everything, with the machine, date, wall
time and command (and in each arm's result the source commit that trained it,
``source_commit``): per seed ``"seeds": {"<seed>": {"arms": {...}}}``, and ``"arms"``, the
first seed's, for reports of one seed.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from typing import Callable

import jax

from mythos_jax import paths
from mythos_jax.runtime import release_compiled_programs
from mythos_jax.train import trainer
from mythos_jax.parallel.mesh import make_mesh
from mythos_jax.checkpoints.training import Checkpointer
from mythos_jax.train.config import TrainConfig, load_train_config, train_config_fields
from mythos_jax.train.step import TrainPlan, TrainState, build_plan

RESULT_FILE = "result.json"
README_MARKERS = ("<!-- results:{name} -->", "<!-- /results:{name} -->")


class ExperimentPreempted(Exception):
    """SIGTERM stopped an arm's training (its checkpoint is saved): the experiment stops."""


@dataclasses.dataclass(frozen=True)
class Arm:
    """One training config of an experiment: ``overrides`` (``section.field=value``) on top of
    the experiment's base config."""
    name: str
    overrides: tuple[str, ...] = ()
    description: str = ""


@dataclasses.dataclass(frozen=True)
class ArmRun:
    """A trained arm, as its evaluation sees it."""
    arm: Arm
    cfg: TrainConfig
    workdir: str
    plan: TrainPlan
    state: TrainState | None      # the last checkpoint (None: diverged before the first)
    train_report: dict            # what ``trainer.train`` returned (depth curve, summary)
    metrics: list[dict]           # the lines of metrics.jsonl
    diverged: str | None          # the trainer's divergence message, if it stopped on one
    quick: bool


@dataclasses.dataclass(frozen=True)
class PodPreset:
    """An experiment at pod scale (models of ~100M-1B parameters, ``arrayrecord`` data from
    ``prepare-data`` for the language-model experiments): ``base`` and ``base_overrides``
    replace the CPU ones and ``arms`` the CPU arms (the same names, sized for the pod);
    ``mythos-jax plan --experiment NAME`` compiles every arm for ``topology`` with ``mesh``."""
    base: str
    base_overrides: tuple[str, ...]
    arms: tuple[Arm, ...]
    topology: str
    mesh: str


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Arms, how to evaluate one, and how to report them all."""
    name: str
    claim: str
    base: str | None
    base_overrides: tuple[str, ...]
    quick_overrides: tuple[str, ...]
    arms: tuple[Arm, ...]
    evaluate: Callable[[ArmRun], dict]
    report: Callable[[dict, str], str]
    quick_arms: tuple[str, ...] | None = None     # the arms --quick runs (None: all)
    seeds: tuple[int, ...] = (0,)                  # a full run's seeds (--quick: the first)
    pod: PodPreset | None = None                   # the same arms at pod scale
    extra_overrides: tuple[str, ...] = ()          # the user's --set, after the arm's own
    # experiments whose finished arms serve here when their config is the same: looked up in
    # the folder beside ``out`` named after each (how `mythos-jax experiment` lays them out)
    shares_arms_with: tuple[str, ...] = ()
    # arms a full run leaves out to keep within its time budget: trained when named with
    # --arms, reported beside the others whenever they have finished
    optional_arms: tuple[str, ...] = ()

    def arm_config(self, arm: Arm, quick: bool, seed: int) -> TrainConfig:
        return load_train_config(self.base, self._arm_overrides(arm, quick, seed))

    def arm_fields(self, arm: Arm, seed: int) -> dict:
        """``arm``'s config fields before they are built (building reads the data)."""
        return train_config_fields(self.base, self._arm_overrides(arm, False, seed))

    def _arm_overrides(self, arm: Arm, quick: bool, seed: int) -> list[str]:
        return [*self.base_overrides, *arm.overrides, *(self.quick_overrides if quick else ()),
                *self.extra_overrides, f"seed={seed}", f"data.seed={seed}"]

    def chosen_arms(self, names: list[str] | None) -> list[Arm]:
        """The arms called ``names`` (None: all but the optional ones); unknown names raise
        ValueError."""
        by_name = {arm.name: arm for arm in self.arms}
        if names is None:
            return [arm for arm in self.arms if arm.name not in self.optional_arms]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"experiment {self.name!r} has no arm(s) {unknown}; its arms: "
                             f"{sorted(by_name)}")
        return [by_name[n] for n in names]

    def at_pod_scale(self) -> "Experiment":
        """This experiment with its pod preset's base and arms (the same evaluation and
        report); ValueError if it has none."""
        if self.pod is None:
            raise ValueError(f"experiment {self.name!r} has no pod preset")
        return dataclasses.replace(self, base=self.pod.base,
                                   base_overrides=self.pod.base_overrides, arms=self.pod.arms)

    def with_overrides(self, overrides: tuple[str, ...]) -> "Experiment":
        """This experiment with ``overrides`` (``section.field=value``) applied to every arm
        after its own (``--set``: a corpus path, a mesh)."""
        return dataclasses.replace(self, extra_overrides=(*self.extra_overrides, *overrides))


def run(experiment: Experiment, out: str, arms: list[str] | None = None, quick: bool = False,
        seeds: list[int] | None = None, command: str | None = None,
        report_only: bool = False) -> dict:
    """Train and evaluate ``arms`` (default: all) at every seed (default: the experiment's,
    only its first with ``quick``) into ``out``; write results.json, the Markdown table and
    the plots; return the results. ``report_only``: train nothing, report the (arm, seed)
    pairs already finished for their current config (a partial run says which are missing)."""
    chosen = experiment.chosen_arms(arms if arms or not quick else experiment.quick_arms)
    if seeds is None:
        seeds = experiment.seeds[:1] if quick else experiment.seeds
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {list(seeds)}")
    os.makedirs(out, exist_ok=True)
    by_seed, total, missing = {}, len(chosen) * len(seeds), []
    for seed_index, seed in enumerate(seeds):
        arm_results = {} if quick else _finished_optional_arms(experiment, out, chosen, seed)
        for index, arm in enumerate(chosen, 1):
            if report_only:
                found = _finished(experiment, out, arm, quick, seed)
                if found is None:
                    missing.append(f"{arm.name}@{seed}")
                else:
                    arm_results[arm.name] = found
                continue
            arm_results[arm.name] = _run_arm(
                experiment, arm, out, quick, seed,
                f"[{seed_index * len(chosen) + index}/{total}, seed {seed}]")
        if arm_results:
            by_seed[str(seed)] = {"arms": {arm.name: arm_results[arm.name]
                                           for arm in experiment.arms if arm.name in arm_results}}
    if not by_seed:
        raise ValueError(f"{out}: no finished arm to report (run the experiment first)")
    if missing:
        print(f"{experiment.name}: not finished, left out of the report: {', '.join(missing)}")
    seeds = [s for s in seeds if str(s) in by_seed]
    results = {
        "experiment": experiment.name, "claim": experiment.claim,
        "command": command or " ".join(["mythos-jax experiment", experiment.name]),
        "machine": machine(), "date": datetime.date.today().isoformat(),
        "seeds_run": list(seeds), "seed": seeds[0], "quick": quick, "unfinished": missing,
        **_wall_times(experiment, by_seed),
        "seeds": by_seed, "arms": by_seed[str(seeds[0])]["arms"],
    }
    table = experiment.report(results, out)
    results["table"] = table
    paths.write_text(os.path.join(out, "results.json"), json.dumps(results, indent=1) + "\n")
    paths.write_text(os.path.join(out, "table.md"), table + "\n")
    print(f"{experiment.name}: results in {out}/results.json, table in {out}/table.md")
    return results


def _wall_times(experiment: Experiment, by_seed: dict) -> dict[str, float]:
    """Seconds summed over the reported runs: ``wall_s`` those of a full run here, then
    those of the optional arms and those taken from another experiment's folder."""
    walls = dict.fromkeys(("wall_s", "optional_wall_s", "taken_wall_s"), 0.0)
    for one in by_seed.values():
        for name, result in one["arms"].items():
            kind = ("taken_wall_s" if "taken_from" in result else
                    "optional_wall_s" if name in experiment.optional_arms else "wall_s")
            walls[kind] += result["wall_s"]
    return walls


def _finished_optional_arms(experiment: Experiment, out: str, chosen: list[Arm],
                            seed: int) -> dict[str, dict]:
    """The optional arms not in ``chosen`` that have finished at ``seed`` for their current
    config (they join the report; nothing is trained)."""
    found = {arm.name: _finished(experiment, out, arm, False, seed) for arm in experiment.arms
             if arm.name in experiment.optional_arms and arm not in chosen}
    return {name: result for name, result in found.items() if result is not None}


def _finished(experiment: Experiment, out: str, arm: Arm, quick: bool, seed: int) -> dict | None:
    """``arm``'s result in ``out`` at ``seed``, if it finished for its current config."""
    return _read_result(os.path.join(arm_workdir(out, arm.name, seed), RESULT_FILE),
                        experiment.arm_config(arm, quick, seed))


def machine() -> dict:
    """What ran the experiment: processor, cores, platform and versions."""
    return {"processor": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "platform": jax.devices()[0].platform, "python": platform.python_version(),
            "jax": jax.__version__}


def source_commit() -> str | None:
    """The git commit of the running mythos_jax source, with "-dirty" when the package has
    uncommitted changes (an arm's numbers are reproducible bit for bit only by the code that
    trained it); None outside a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.exists(os.path.join(root, ".git")):
        return None

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--", "mythos_jax")
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def include_in_readme(readme: str, name: str, table: str) -> None:
    """Replace the text between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` in
    ``readme`` by ``table`` (the markers must be there)."""
    with open(readme) as f:
        text = f.read()
    start, end = (marker.format(name=name) for marker in README_MARKERS)
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"{readme}: no {start} ... {end} section to fill")
    paths.write_text(readme, pattern.sub(lambda _: f"{start}\n{table}\n{end}", text))


# ---------------------------------------------------------------------------- one arm
def _run_arm(experiment: Experiment, arm: Arm, out: str, quick: bool, seed: int,
             progress: str) -> dict:
    cfg = experiment.arm_config(arm, quick, seed)
    workdir = arm_workdir(out, arm.name, seed)
    result_path = os.path.join(workdir, RESULT_FILE)
    cached = _read_result(result_path, cfg)
    if cached is not None:
        print(f"{progress} {experiment.name}/{arm.name}: done earlier "
              f"({cached['wall_s']:.0f} s), skipped", flush=True)
        return cached
    for other in experiment.shares_arms_with:
        shared = _read_result(os.path.join(arm_workdir(os.path.join(
            os.path.dirname(os.path.abspath(out)), other), arm.name, seed), RESULT_FILE), cfg)
        if shared is not None:
            print(f"{progress} {experiment.name}/{arm.name}: {other}'s, the same config "
                  f"({shared['wall_s']:.0f} s), taken", flush=True)
            shared["taken_from"] = other
            os.makedirs(workdir, exist_ok=True)
            paths.write_text(result_path, json.dumps(shared, indent=1) + "\n")
            return shared
    print(f"{progress} {experiment.name}/{arm.name}: training {cfg.steps} steps "
          f"({arm.description or ', '.join(arm.overrides)})", flush=True)
    started = time.time()
    diverged = None
    try:
        report = trainer.train(cfg, workdir)
    except trainer.TrainingDiverged as err:
        report, diverged = {}, str(err)
    if report.get("preempted"):
        raise ExperimentPreempted(f"{experiment.name}/{arm.name} (seed {seed}) stopped at step "
                                  f"{report['step']}: rerun the same command to resume")
    plan = build_plan(cfg, make_mesh(cfg.mesh))
    checkpointer = Checkpointer(workdir, plan)
    try:
        state = None if checkpointer.latest_step() is None else checkpointer.restore()
    finally:
        checkpointer.close()
    metrics = trainer.read_metrics(workdir)
    result = experiment.evaluate(ArmRun(arm, cfg, workdir, plan, state, report, metrics,
                                        diverged, quick))
    result.update(config=cfg.to_dict(), wall_s=time.time() - started,
                  steps=max(m["step"] for m in metrics), commit=source_commit())
    paths.write_text(result_path, json.dumps(result, indent=1) + "\n")
    print(f"{progress} {experiment.name}/{arm.name}: finished in {result['wall_s']:.0f} s",
          flush=True)
    release_compiled_programs()   # the next arm compiles its own programs
    return result


def arm_workdir(out: str, arm: str, seed: int) -> str:
    """Where ``arm`` trains at ``seed``."""
    return os.path.join(out, "arms", arm, f"seed-{seed}")


def _read_result(path: str, cfg: TrainConfig) -> dict | None:
    """A finished arm's result, if it was written for this very config (a field added since
    then counts as its default, which keeps the earlier behaviour)."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        result = json.load(f)
    try:
        same = TrainConfig.from_dict(result.get("config") or {}) == cfg
    except (TypeError, ValueError):    # a field since removed or renamed, or a bad value
        same = False
    return result if same else None


def mean_training_loops(run: ArmRun) -> float:
    """The mean loop count the arm's training steps drew (from metrics.jsonl)."""
    drawn = [m["loops"] for m in run.metrics if "loops" in m]
    return sum(drawn) / max(1, len(drawn))


def parameter_count(params) -> int:
    """Elements of every leaf of a parameter tree (arrays or shape structs)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def report_head(results: dict, targets: list[dict]) -> list[str]:
    """The first lines of every experiment's table: where and how it ran, then one row per
    target (the claim, our number, met or not)."""
    m = results["machine"]
    seeds = results.get("seeds_run", [results["seed"]])
    lines = [f"{results['date']}, {m['processor']} ({m['cores']} cores, {m['platform']}), jax "
             f"{m['jax']}, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}, "
             f"wall {results['wall_s'] / 60:.1f} min{_wall_apart(results)}: "
             f"`{results['command']}`", ""]
    if results.get("unfinished"):
        lines += [f"**Partial:** not finished in the time given, and left out of every figure "
                  f"below: {', '.join(results['unfinished'])} (arm@seed).", ""]
    lines += ["| claim | ours | met |", "|---|---|---|"]
    return lines + [f"| {t['claim']} | {t['ours']} | {'yes' if t['met'] else 'no'} |"
                    for t in targets]


def _wall_apart(results: dict) -> str:
    """What the wall time leaves out: the optional arms, the runs taken from elsewhere."""
    apart = {"optional_wall_s": "the optional arms",
             "taken_wall_s": "the runs taken from another experiment"}
    parts = [f"{what} {results[key] / 60:.1f} min" for key, what in apart.items()
             if results.get(key)]
    return f" (not counted: {', '.join(parts)})" if parts else ""


def loss_curve(report: dict, split: str, field: str = "loss") -> dict[str, float]:
    """``{test_loops: value}`` of one eval split of the trainer's final depth curve."""
    return {str(n): float(v[field]) for n, v in sorted(report["depth_curve"][split].items())}


def run_from_command_line(name: str, argv: list[str] | None = None) -> int:
    """``python experiments/NAME.py [flags]``: the same as ``mythos-jax experiment NAME``."""
    from mythos_jax.cli import main
    return main(["experiment", name, *(sys.argv[1:] if argv is None else argv)])
