"""Training end to end: config, optimizer masks, a short run and its depth curve, a skipped
non-finite step, SIGTERM and exact resume after SIGKILL, resharded restore, two local processes
through tpu_setup/launch.sh (and one resuming them), and the eval command."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mythos_jax import flop_count
from mythos_jax.parallel.mesh import make_mesh
from mythos_jax.checkpoints.training import Checkpointer
from mythos_jax.train.config import CheckpointConfig, TrainConfig, load_train_config
from mythos_jax.train.optim import build_optimizer, decay_mask, learning_rate
from mythos_jax.train.step import build_plan, init_train_state, make_train_step
from mythos_jax.train.trainer import PREEMPTED_EXIT, read_metrics, train
from processes import cli, committed_steps, free_port, step_lines, subprocess_env

REPO = Path(__file__).resolve().parents[1]

# A few seconds per run: the tiny preset, short sequences, every loop count 1..3.
QUICK = ["steps=8", "checkpoint.every=2", "log.every=2", "log.tensorboard=false",
         "eval.loops=[1,3]", "checkpoint.async_save=false"]


# ---------------------------------------------------------------------------- config
def test_presets_overrides_and_files(tmp_path):
    cfg = load_train_config("tiny", ["optim.lr=1e-3", "loops.backprop_depth=2",
                                     "model.dim=32", "eval.loops=1,2", "data.seq_len=16"])
    assert cfg.optim.lr == 1e-3 and cfg.loops.backprop_depth == 2
    assert cfg.eval.loops == (1, 2) and cfg.model_config().dim == 32
    path = tmp_path / "run.yaml"
    path.write_text("steps: 5\nmodel: {variant: tiny_gqa}\nloops: {schedule: fixed, n: 2}\n"
                    "data: {seq_len: 32}\n")
    from_file = load_train_config(str(path), ["loops.backprop_depth=null"])
    assert from_file.steps == 5 and from_file.model_config().attn_type == "gqa"
    assert from_file.loops.build().loop_spec(None).count == 2
    assert from_file.loops.backprop_depth is None
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    # YAML 1.2 booleans: "off" / "on" are the mode names they look like, not False / True.
    path.write_text("model: {act: off}\nlog: {progress: false}\ndata: {seq_len: 32}\n")
    yaml_off = load_train_config(str(path), ["model.injection=additive"])
    assert yaml_off.model_config().act == "off" and yaml_off.log.progress is False
    assert load_train_config("tiny", ["model.act=off"]).model_config().act == "off"


@pytest.mark.parametrize("overrides, field", [
    (["optim.lr=-1"], "optim.lr"),
    (["loops.schedule=geometric"], "loops.schedule"),
    (["optim.bogus=1"], "bogus"),
    (["model.variant=mythos_2b"], "model.variant"),
    (["model.n_layers=3"], "model.n_layers"),
    (["model.max_seq_len=16", "data.seq_len=32"], "model.max_seq_len"),
    (["steps=ten"], "steps"),
    (["optim.grad_accum=3"], "optim.grad_accum"),
    (["rules=bogus"], "rules"),
])
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_train_config("tiny", overrides)


def test_unknown_config_source():
    with pytest.raises(ValueError, match="neither a preset"):
        load_train_config("no_such_preset")


@pytest.mark.parametrize("name, text, message", [
    ("run.yaml", "steps: 5\nmodel: {variant: [tiny\n", "run.yaml:3:1: invalid YAML: "),
    ("run.json", '{"steps": 5,\n "model": }', "run.json:2:11: invalid JSON: Expecting value"),
])
def test_user_errors_are_one_line(tmp_path, capsys, name, text, message):
    """Malformed configs (file:line:column), a workdir under a regular file, a data file that
    is not text: ``error: ...`` naming the thing, exit code 2, no traceback."""
    from mythos_jax.cli import main
    config = tmp_path / name
    config.write_text(text)
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"text": "\xff"}\n')
    cases = [
        (["--config", str(config), "--workdir", str(tmp_path / "run")],
         f"{tmp_path / message}"),
        (["--config", "tiny", "--workdir", str(config / "run")],
         f"{config / 'run'}: Not a directory"),
        (["--config", "tiny", "--workdir", str(tmp_path / "run"), "--set", "data.source=jsonl",
          "--set", f"data.paths=[{data}]"], f"{data}:1: not UTF-8 text"),
    ]
    for argv, start in cases:
        assert main(["train", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {start}") and err.count("\n") == 1, err


def test_weight_decay_skips_norms_injection_and_vectors():
    plan = build_plan(load_train_config("tiny"), make_mesh("data=1", jax.devices()[:1]))
    mask = decay_mask(plan.abstract_state.params)
    assert mask["embed"] and mask["recurrent"]["block"]["ffn"]["gate"]
    assert not mask["norm"]["weight"]
    assert not any(jax.tree.leaves(mask["recurrent"]["injection"]))
    assert not mask["recurrent"]["act"]["halt"]["bias"]
    assert "router_bias" not in str(jax.tree_util.tree_structure(plan.abstract_state.params))


def test_the_optimizer_is_adamw_with_the_documented_settings_decaying_matrices_only():
    """README: AdamW b1 0.9, b2 0.95, weight decay 0.1 on matrices only. From zero moments, a
    zero gradient moves only the matrix, by lr * wd * value; a gradient g leaves moments
    (1 - b1) g and (1 - b2) g^2."""
    optim = load_train_config("tiny", ["optim.clip_norm=0", "optim.warmup_steps=0"]).optim
    assert (optim.b1, optim.b2, optim.weight_decay) == (0.9, 0.95, 0.1)
    params = {"kernel": jnp.full((2, 3), 2.0), "norm": jnp.full((3,), 2.0)}
    tx = build_optimizer(optim, total_steps=10)
    lr = float(learning_rate(optim, 10)(0))
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    assert lr > 0 and not np.any(np.asarray(updates["norm"]))
    np.testing.assert_allclose(updates["kernel"], -lr * 0.1 * 2.0, rtol=1e-6)
    grads = {"kernel": jnp.full((2, 3), 3.0), "norm": jnp.full((3,), -1.0)}
    _, state = tx.update(grads, tx.init(params), params)
    for name, g in grads.items():
        np.testing.assert_allclose(optax.tree_utils.tree_get(state, "mu")[name], 0.1 * g,
                                   rtol=1e-6)
        np.testing.assert_allclose(optax.tree_utils.tree_get(state, "nu")[name], 0.05 * g**2,
                                   rtol=1e-6)


def test_print_config_prints_the_resolved_config_and_trains_nothing(tmp_path, capsys):
    from mythos_jax.cli import main

    workdir = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--set", "optim.lr=0.25", "--set", "steps=7",
                 "--workdir", str(workdir), "--print-config"]) == 0
    printed = TrainConfig.from_dict(json.loads(capsys.readouterr().out))
    assert printed == load_train_config("tiny", ["optim.lr=0.25", "steps=7"])
    assert printed.optim.lr == 0.25 and printed.steps == 7 and not workdir.exists()

    # A JSON file through the same entry: its fields applied, --set on top, the rest defaults.
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"steps": 7, "seed": 3, "model": {"variant": "tiny_gqa"},
                                "data": {"seq_len": 32, "batch_size": 4},
                                "loops": {"schedule": "fixed", "n": 2},
                                "optim": {"lr": 0.5, "warmup_steps": 3}}))
    assert main(["train", "--config", str(path), "--set", "optim.lr=0.25", "--set",
                 "data.batch_size=2", "--workdir", str(workdir), "--print-config"]) == 0
    printed = TrainConfig.from_dict(json.loads(capsys.readouterr().out))
    assert (printed.steps, printed.seed, printed.model) == (7, 3, {"variant": "tiny_gqa"})
    assert (printed.data.seq_len, printed.data.batch_size) == (32, 2)
    assert printed.loops.build().loop_spec(None).count == 2
    assert (printed.optim.lr, printed.optim.warmup_steps) == (0.25, 3)
    assert printed.checkpoint == CheckpointConfig()
    path.write_text(json.dumps({"data": {"seq_len": 32}, "optim": {"lr": 0.5, "bogus": 1}}))
    assert main(["train", "--config", str(path), "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: optim: unknown field(s) ['bogus']") and err.count("\n") == 1
    assert not workdir.exists()


@pytest.mark.parametrize("loops", [["loops.per_sequence=true", "loops.backprop_depth=2"],
                                   ["loops.max_loops=4"]], ids=["truncated", "full"])
def test_the_jitted_training_step_holds_no_host_callback(loops):
    """Token ids and loop counts are traced inside the step: no host round trip per step."""
    cfg = load_train_config("tiny", loops)
    plan = build_plan(cfg, make_mesh("data=1", jax.devices()[:1]))
    batch = {name: jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len), dtype)
             for name, dtype in (("inputs", "int32"), ("targets", "int32"),
                                 ("loss_mask", "float32"))}
    with plan.context():
        jaxpr = str(jax.make_jaxpr(make_train_step(plan).jitted)(plan.abstract_state, batch))
    assert "while" in jaxpr or "scan" in jaxpr
    assert "callback" not in jaxpr


def test_batches_with_out_of_vocab_ids_are_refused_on_the_host():
    from mythos_jax.train.evaluate import global_batch

    cfg = load_train_config("tiny")
    plan = build_plan(cfg, make_mesh("data=1", jax.devices()[:1]))
    shape = (cfg.data.batch_size, cfg.data.seq_len)
    batch = {"inputs": np.zeros(shape, np.int32), "targets": np.zeros(shape, np.int32),
             "loss_mask": np.ones(shape, np.float32)}
    assert global_batch(plan, batch)["inputs"].shape == shape
    batch["targets"][0, 3] = plan.model_cfg.vocab_size
    with pytest.raises(ValueError, match=r"batch 'targets' holds token ids outside \[0, "
                                         r"vocab_size=258\): min 0, max 258"):
        global_batch(plan, batch)


# ---------------------------------------------------------------------------- a short run
# Every in-process run below uses the QUICK config (one compiled step, shared through the
# persistent compilation cache).
@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """(config, workdir, report) of a QUICK run with TensorBoard, a 2-batch depth curve at
    step 4 and at the end, and a set MFU peak."""
    workdir = str(tmp_path_factory.mktemp("short") / "run")
    cfg = load_train_config("tiny", QUICK + ["log.tensorboard=true", "eval.batches=2",
                                             "eval.every=4", "log.peak_flops=1e9"])
    return cfg, workdir, train(cfg, workdir)


def tiny_lr(step: int) -> float:
    """The tiny preset's rate at ``step`` updates done, over 8 steps: linear warmup 0 -> 3e-3
    over 5 steps, then cosine to 3e-4 at step 8."""
    if step < 5:
        return 3e-3 * step / 5
    return 3e-4 + (3e-3 - 3e-4) * 0.5 * (1 + np.cos(np.pi * (step - 5) / 3))


def test_short_run_learns_writes_everything_and_resharded_restore(short_run):
    cfg, workdir, report = short_run
    lines = step_lines(workdir)
    assert sorted(lines) == list(range(1, 9))
    losses = [lines[s]["loss"] for s in range(1, 9)]
    assert np.all(np.isfinite(losses)) and np.mean(losses[-2:]) < np.mean(losses[:2])
    assert set(report["depth_curve"]["heldout"]) == {1, 3}
    assert os.path.exists(report["plot"])
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert all(0 < lines[s]["rho_A"] < 1 for s in lines)
    assert {lines[s]["loops"] for s in lines} <= {1.0, 2.0, 3.0}
    assert len({lines[s]["loops"] for s in lines}) > 1, "depth should vary between steps"
    model = cfg.model_config()
    tokens = cfg.data.batch_size * cfg.data.seq_len
    for s, line in lines.items():
        assert 0 <= line["accuracy"] <= 1 and (line["accuracy"] * tokens).is_integer()
        assert np.isfinite(line["grad_norm"]) and line["grad_norm"] > 0
        assert line["lr"] == pytest.approx(tiny_lr(s - 1), rel=1e-5, abs=1e-12), s
        load = np.array(line["expert_load"])     # (token, slot) assignments, every loop run
        assert load.shape == (model.n_experts,) and load.min() >= 0
        assert load.sum() == tokens * model.n_experts_per_tok * line["loops"]
        assert line["load_max_over_mean"] == pytest.approx(load.max() / load.mean(), rel=1e-6)
    evals = [line for line in read_metrics(workdir) if "eval" in line]
    assert [line["step"] for line in evals] == [4, 8]
    for line in evals:
        assert set(line["eval"]) == {"heldout"} and set(line["eval"]["heldout"]) == {"1", "3"}
        for point in line["eval"]["heldout"].values():
            assert set(point) == {"loss", "accuracy", "exact_match", "tokens", "sequences"}
            assert all(np.isfinite(v) for v in point.values())
    assert evals[0]["eval"] != evals[1]["eval"]
    assert evals[1]["eval"]["heldout"] == {str(n): v for n, v in
                                           report["depth_curve"]["heldout"].items()}

    # MFU of the last logged interval (steps 7, 8): tokens/s x the training FLOPs of the loops
    # each step drew, over log.peak_flops x devices.
    drawn = [int(lines[s]["loops"]) for s in (7, 8)]
    assert drawn != [cfg.loops.max_loops] * 2, "the check needs a step below max_loops"
    train_flops = np.mean([flop_count.flops(model, cfg.data.seq_len, n)["train"]
                           for n in drawn])
    summary = report["train"]
    assert summary["loops"] == np.mean(drawn) and summary["tokens_per_s"] > 0
    assert summary["mfu"] == pytest.approx(
        summary["tokens_per_s"] * train_flops / (1e9 * jax.device_count()), rel=1e-6)

    # Restore onto another mesh layout: same values, the new shardings.
    other = load_train_config("tiny", QUICK + ["mesh=fsdp=4,tensor=2"])
    plan = build_plan(other, make_mesh(other.mesh))
    checkpointer = Checkpointer(workdir, plan)
    restored = checkpointer.restore()
    checkpointer.close()
    original = Checkpointer(workdir, build_plan(cfg, make_mesh(cfg.mesh))).restore()
    assert int(restored.step) == 8
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(original), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    embed = restored.params["embed"]
    assert embed.sharding.spec == plan.shardings.params["embed"].spec
    assert embed.sharding.mesh.shape["fsdp"] == 4


def _explicit_depth_point(model, batches, n_loops):
    """Loss and token accuracy over every loss-masked token of ``batches`` and exact match
    over their answered rows at ``n_loops``, in float64 numpy from the model's logits."""
    nll_sum = right_sum = tokens = exact_rows = answered_rows = 0.0
    for batch in batches:
        logits = np.asarray(model(jnp.asarray(batch["inputs"]), n_loops), np.float64)
        shifted = logits - logits.max(-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        targets, mask = batch["targets"], batch["loss_mask"]
        nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
        right = logits.argmax(-1) == targets
        answered = mask.sum(1) > 0
        nll_sum += (nll * mask).sum()
        right_sum += (right * mask).sum()
        tokens += mask.sum()
        exact_rows += (np.all(right | (mask == 0), axis=1) & answered).sum()
        answered_rows += answered.sum()
    return {"loss": nll_sum / tokens, "accuracy": right_sum / tokens,
            "exact_match": exact_rows / answered_rows, "tokens": tokens,
            "sequences": answered_rows}


def test_the_depth_curve_is_the_explicit_mean_over_eval_batches(short_run):
    """evaluate()'s numbers at every eval loop count against a float64 recomputation from the
    final checkpoint, token-weighted over the same held-out batches."""
    from mythos_jax.train.data import eval_batches
    from mythos_jax.train.evaluate import eval_sums
    from mythos_jax.train.step import model_from_state

    cfg, workdir, report = short_run
    plan = build_plan(cfg, make_mesh(cfg.mesh))
    state = jax.tree.map(jnp.asarray, jax.device_get(Checkpointer(workdir, plan).restore()))
    model = model_from_state(plan, state)
    model.eval()
    batches = eval_batches(cfg.data, "heldout")[:cfg.eval.batches]
    assert len(batches) == 2
    for n_loops, got in report["depth_curve"]["heldout"].items():
        want = _explicit_depth_point(model, batches, n_loops)
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-7,
                                       err_msg=f"{name} at {n_loops} loops")
    # Exact match on rows built for it: right, wrong on an answer token, wrong only off the
    # answer (counts as right), no answer at all (not counted).
    targets = jnp.arange(12).reshape(4, 3)
    mask = jnp.array([[0, 1, 1], [0, 1, 1], [0, 0, 1], [0, 0, 0]], jnp.float32)
    logits = jax.nn.one_hot(targets.at[1, 2].add(1).at[2, 0].add(1), 12)
    nll, right, tokens, exact, sequences = np.asarray(eval_sums(logits, targets, mask))
    assert (right, tokens, exact, sequences) == (4, 5, 2, 3)


def test_incompatible_checkpoint_is_named(tmp_path):
    workdir = str(tmp_path / "run")
    train(load_train_config("tiny", QUICK), workdir, stop_after=2)
    with pytest.raises(ValueError, match=r"model\.dim: checkpoint 64, config 32"):
        train(load_train_config("tiny", QUICK + ["model.dim=32"]), workdir)
    with pytest.raises(ValueError, match=r"data\.seq_len: checkpoint 32, config 16"):
        train(load_train_config("tiny", QUICK + ["data.seq_len=16"]), workdir)
    with pytest.raises(ValueError, match=r"optimizer state has another structure than this "
                                         r"config's \(optim\.clip_norm: checkpoint 1\.0, "
                                         r"config 0\.0\)"):
        train(load_train_config("tiny", QUICK + ["optim.clip_norm=0"]), workdir)
    train(load_train_config("tiny", QUICK + ["optim.lr=1e-4"]), workdir)   # same structure


def test_a_new_run_drops_the_metrics_of_an_attempt_that_never_checkpointed(tmp_path):
    """An attempt that died before its first checkpoint left steps 1-3 and a torn line; the
    new run logs every step once (appending would log 1-3 twice and leave the torn line in
    the middle, where it fails every later read)."""
    work = tmp_path / "w"
    work.mkdir()
    stale = "".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (1, 2, 3))
    (work / "metrics.jsonl").write_text(stale + '{"step": 4, "lo')
    train(load_train_config("tiny", QUICK + ["eval.loops=[1]"]), str(work))
    records = [r for r in read_metrics(work) if "eval" not in r]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(r["loss"] != 9.0 for r in records)


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path, monkeypatch):
    from mythos_jax.train import trainer
    cfg = load_train_config("tiny", QUICK + ["optim.max_nonfinite=3", "log.every=1"])

    def poisoned(plan):     # a NaN in one parameter: every step is non-finite
        state = init_train_state(plan)
        params = dict(state.params, embed=state.params["embed"] * np.nan)
        return state._replace(params=params)

    monkeypatch.setattr(trainer, "init_train_state", poisoned)
    with pytest.raises(trainer.TrainingDiverged, match="3 non-finite steps in a row"):
        train(cfg, str(tmp_path / "run"))
    lines = step_lines(str(tmp_path / "run"))
    assert [lines[s]["nonfinite_streak"] for s in sorted(lines)] == [1, 2, 3]
    assert not any(lines[s]["finite"] for s in lines)


def _host_leaves(tree) -> dict[str, np.ndarray]:
    """Host copies of every leaf by key path (the step donates the state it is given)."""
    return {jax.tree_util.keystr(path): np.array(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_one_nonfinite_batch_is_skipped_bitwise_and_the_streak_resets():
    """A healthy run, one batch with a NaN in its loss mask, one step with a finite loss but
    NaN gradients, then a good batch: each bad step leaves parameters, optimizer state (its
    count included) and the router bias bit for bit as they were and counts one more skip;
    the next good step updates them and resets the count."""
    from mythos_jax.train.data import train_iterator
    from mythos_jax.train.evaluate import global_batch

    cfg = load_train_config("tiny", QUICK)
    assert cfg.optim.router_bias_rate > 0
    plan = build_plan(cfg, make_mesh("data=1", jax.devices()[:1]))
    step_fn, batches = make_train_step(plan), train_iterator(cfg.data)
    state, metrics = step_fn(init_train_state(plan), global_batch(plan, next(batches)))
    healthy = {part: _host_leaves(getattr(state, part))
               for part in ("params", "opt_state", "buffers")}
    bias = [k for k in healthy["buffers"] if "router_bias" in k]
    assert bias and bool(metrics["finite"])

    poisoned = next(batches)
    poisoned["loss_mask"] = poisoned["loss_mask"].copy()
    poisoned["loss_mask"][0, 0] = np.nan
    state, metrics = step_fn(state, global_batch(plan, poisoned))
    assert not bool(metrics["finite"]) and not np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 2 and int(state.nonfinite) == 1
    _assert_unchanged(state, healthy)

    # A NaN in the depth-wise LoRA scale of the last loop, which this step does not run: the
    # masked scan's where() hides it from the loss but not from the gradients (0 * NaN).
    host = jax.tree.map(np.array, state)
    unrun = cfg.loops.max_loops - 1
    scale = host.params["recurrent"]["lora"]["scale"]
    good_row, scale[unrun] = scale[unrun].copy(), np.nan
    state = jax.device_put(host, plan.shardings)
    before = {part: _host_leaves(getattr(host, part)) for part in healthy}
    state, metrics = step_fn(state, global_batch(plan, next(batches)))
    assert float(metrics["loops"]) <= unrun                 # the poisoned depth was not run
    assert np.isfinite(float(metrics["loss"])) and not np.isfinite(float(metrics["grad_norm"]))
    assert not bool(metrics["finite"]) and int(state.step) == 3 and int(state.nonfinite) == 2
    _assert_unchanged(state, before)
    host = jax.tree.map(np.array, state)
    host.params["recurrent"]["lora"]["scale"][unrun] = good_row
    state = jax.device_put(host, plan.shardings)

    state, metrics = step_fn(state, global_batch(plan, next(batches)))
    assert bool(metrics["finite"]) and int(metrics["nonfinite_streak"]) == 0
    assert int(state.nonfinite) == 0
    updated = {part: _host_leaves(getattr(state, part)) for part in healthy}
    for part in ("params", "opt_state"):
        assert all(np.all(np.isfinite(v)) for v in updated[part].values())
        assert any(not np.array_equal(updated[part][k], v) for k, v in healthy[part].items())
    assert all(not np.array_equal(updated["buffers"][k], healthy["buffers"][k]) for k in bias)


def _assert_unchanged(state, before: dict) -> None:
    """``state``'s parts named in ``before`` hold ``before``'s host leaves bit for bit."""
    for part, leaves in before.items():
        after = _host_leaves(getattr(state, part))
        assert list(after) == list(leaves)
        for key, value in leaves.items():
            assert after[key].dtype == value.dtype and after[key].tobytes() == value.tobytes(), (
                part, key)


def test_gradient_accumulation_averages_micro_batches():
    import jax.numpy as jnp
    from mythos_jax.train.step import _accumulated_grads

    def loss_fn(params, buffers, batch, counts):     # a mean over rows, like the real loss
        loss = jnp.mean((batch["x"] @ params["w"] - counts[:, None]) ** 2)
        return loss, ({"loss": loss}, {"seen": buffers["seen"] + batch["x"].shape[0]})

    params = {"w": jnp.arange(6.0).reshape(3, 2)}
    batch = {"x": jax.random.normal(jax.random.key(0), (8, 3))}
    counts = jnp.arange(8, dtype=jnp.float32)
    whole, _, _ = _accumulated_grads(loss_fn, params, {"seen": 0}, batch, counts, 1)
    split, metrics, buffers = _accumulated_grads(loss_fn, params, {"seen": 0}, batch, counts, 4)
    np.testing.assert_allclose(split["w"], whole["w"], rtol=1e-5)
    assert buffers["seen"] == 8 and metrics["loss"].shape == ()


# ---------------------------------------------------------------------------- subprocesses
# The interrupted-run tests: progress lines on (each names its step), a log line per step.
INTERRUPTED = QUICK + ["log.every=1", "log.progress=true", "checkpoint.async_save=true",
                       "eval.loops=[1]", "log.peak_flops=1e11"]


def _train_command(workdir, overrides=INTERRUPTED):
    return cli(["train", "--config", "tiny", "--workdir", str(workdir)]
                + [a for o in overrides for a in ("--set", o)])


def trained_steps(output: str) -> list[int]:
    """The steps a process trained, from its progress lines ``[###...] step 3/8  loss ...``."""
    return [int(n) for n in re.findall(r"\] step (\d+)/\d+ ", output)]


class Run(NamedTuple):
    """One training process: exit code, output, committed checkpoint steps when it ended."""
    code: int
    output: str
    committed: list[int]


def _interrupt(workdir, log, cache, ready, sig) -> Run:
    """Start a run in ``workdir`` (output to ``log``), send ``sig`` once ``ready()`` holds."""
    with open(log, "w") as out:
        process = subprocess.Popen(_train_command(workdir), env=subprocess_env(cache),
                                   stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not ready():
            assert process.poll() is None, open(log).read()       # it ended too early
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.02)
        process.send_signal(sig)
        code = process.wait(timeout=300)
    return Run(code, open(log).read(), committed_steps(workdir))


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """An uninterrupted reference run, and one run of the same command stopped twice: SIGTERM
    once it has logged a step (``term``, with the steps logged by then); resumed and SIGKILLed
    once it has committed a newer checkpoint (``kill``); resumed to the end (``last``)."""
    root = tmp_path_factory.mktemp("interrupted")
    cache = root / "xla"      # written by the runs that end cleanly; the killed one gets a copy
    reference, work = root / "reference", str(root / "run")
    subprocess.run(_train_command(reference), check=True, env=subprocess_env(cache),
                   capture_output=True, timeout=300)
    metrics = os.path.join(work, "metrics.jsonl")
    term = _interrupt(work, root / "term.log", cache, lambda: os.path.exists(metrics)
                      and os.path.getsize(metrics) > 0, signal.SIGTERM)
    logged = sorted(step_lines(work))
    shutil.copytree(cache, root / "xla-killed")
    kill = _interrupt(work, root / "kill.log", root / "xla-killed",
                      lambda: committed_steps(work)[-1] > term.committed[-1], signal.SIGKILL)
    last = subprocess.run(_train_command(work), env=subprocess_env(cache), capture_output=True,
                          text=True, timeout=300)
    return {"reference": step_lines(reference), "work": work, "term": term, "logged": logged,
            "kill": kill, "last": Run(last.returncode, last.stdout + last.stderr, [])}


def test_sigterm_checkpoints_and_exits_and_the_rerun_continues_at_the_next_step(interrupted):
    term = interrupted["term"]
    stopped = int(re.search(r"stopped at step (\d+) \(preempted\); rerun the same command",
                            term.output)[1])
    assert term.code == PREEMPTED_EXIT, term.output
    assert term.committed[-1] == stopped
    assert trained_steps(term.output) == interrupted["logged"] == list(range(1, stopped + 1))
    resumed = interrupted["kill"].output
    assert f"resumed from {interrupted['work']}/checkpoints at step {stopped}\n" in resumed
    assert trained_steps(resumed)[0] == stopped + 1, resumed


def test_resume_after_sigkill_gives_the_same_losses(interrupted):
    """Killed after a committed checkpoint, rerun: the rerun resumes at that step, trains only
    the steps after it, and the log holds every step once, bit for bit the reference's."""
    kill, last = interrupted["kill"], interrupted["last"]
    assert kill.code == -signal.SIGKILL
    killed_at = kill.committed[-1]
    assert interrupted["term"].committed[-1] < killed_at < 8, kill.committed
    assert last.code == 0, last.output
    assert f"resumed from {interrupted['work']}/checkpoints at step {killed_at}\n" in last.output
    assert trained_steps(last.output) == list(range(killed_at + 1, 9))
    records = [r["step"] for r in read_metrics(interrupted["work"]) if "eval" not in r]
    assert records == list(range(1, 9))
    ref, got = interrupted["reference"], step_lines(interrupted["work"])
    for step in range(1, 9):
        assert got[step]["batch_fingerprint"] == ref[step]["batch_fingerprint"], step
        assert got[step]["loss"] == ref[step]["loss"], step          # bitwise on CPU


def test_two_processes_launched_match_one_process_and_hand_over_the_data(tmp_path, capsys,
                                                                      monkeypatch):
    """tpu_setup/launch.sh --local 2 (two processes, one CPU device each, one coordinator)
    trains the batches and losses of one process with two devices (this one, on two of its
    devices); one process resumes the two processes' checkpoint at its data position."""
    from mythos_jax.train import trainer

    overrides = QUICK + ["checkpoint.keep=4", "eval.loops=[1]", "log.peak_flops=1e11"]
    cfg = load_train_config("tiny", overrides)
    monkeypatch.setattr(trainer, "make_mesh", lambda spec: make_mesh(spec, jax.devices()[:2]))
    single, multi = tmp_path / "single", tmp_path / "multi"
    train(cfg, str(single))
    env = {**subprocess_env(), "XLA_FLAGS": "--xla_backend_optimization_level=0"}  # 1 device each
    result = subprocess.run(
        ["bash", str(REPO / "tpu_setup" / "launch.sh"), "--local", "2", "--port",
         str(free_port()), "--workdir", str(multi), "--",
         *[a for o in overrides for a in ("--set", o)]],
        env={**env, "MYTHOS_JAX": str(Path(sys.executable).parent / "mythos-jax")},
        cwd=REPO, capture_output=True, text=True, timeout=400)
    logs = [(multi / "logs" / f"{i}.log").read_text() for i in range(2)]
    assert result.returncode == 0, result.stderr + "\n".join(logs)
    assert "mesh {'data': 2" in logs[0]          # one device from each process
    assert not (multi / "train.lock").exists()   # one lock, process 0's, released
    one, two = step_lines(single), step_lines(multi)
    assert [r["step"] for r in read_metrics(multi) if "eval" not in r] == list(range(1, 9))
    for step in one:
        assert two[step]["batch_fingerprint"] == one[step]["batch_fingerprint"], step
        np.testing.assert_allclose(two[step]["loss"], one[step]["loss"], rtol=1e-6)

    # The data position and state the two processes saved at step 4, resumed by one process.
    handed = tmp_path / "handed"
    shutil.copytree(multi, handed)
    for step in (6, 8):
        shutil.rmtree(handed / "checkpoints" / str(step))
    capsys.readouterr()
    assert train(cfg, str(handed))["step"] == 8
    assert f"resumed from {handed}/checkpoints at step 4\n" in capsys.readouterr().out
    resumed = step_lines(handed)
    for step in range(5, 9):
        assert resumed[step]["batch_fingerprint"] == one[step]["batch_fingerprint"], step
        np.testing.assert_allclose(resumed[step]["loss"], one[step]["loss"], rtol=1e-6)


def test_eval_command_prints_the_depth_curve(short_run, tmp_path, capsys):
    from mythos_jax.cli import main
    workdir = short_run[1]            # read only: the command writes nothing there
    out_json = str(tmp_path / "eval.json")
    assert main(["eval", "--workdir", workdir, "--loops", "1,3", "--batches", "1",
                 "--json", out_json]) == 0
    printed = capsys.readouterr().out
    assert "checkpoint step 8" in printed and "heldout" in printed
    results = json.load(open(out_json))
    assert set(results["heldout"]) == {"1", "3"}
    assert main(["eval", "--workdir", str(tmp_path / "nothing")]) == 2
