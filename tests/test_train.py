"""Training end to end: config, optimizer masks, a short run, exact resume after SIGKILL,
resharded restore, two local processes, and the eval command."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mythos_jax.parallel.mesh import make_mesh
from mythos_jax.checkpoints.training import Checkpointer
from mythos_jax.train.config import TrainConfig, load_train_config
from mythos_jax.train.optim import decay_mask
from mythos_jax.train.step import build_plan, init_train_state, make_train_step
from mythos_jax.train.trainer import read_metrics, train

# A few seconds per run: the tiny preset, short sequences, every loop count 1..3.
QUICK = ["steps=8", "checkpoint.every=2", "log.every=2", "log.tensorboard=false",
         "eval.loops=[1,3]", "checkpoint.async_save=false"]


def step_lines(workdir):
    return {line["step"]: line for line in read_metrics(workdir) if "eval" not in line}


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
def test_short_run_learns_writes_everything_and_resharded_restore(tmp_path):
    workdir = str(tmp_path / "run")
    cfg = load_train_config("tiny", QUICK + ["log.tensorboard=true"])
    report = train(cfg, workdir)
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

    # Restore onto another mesh layout: same values, the new shardings.
    other = load_train_config("tiny", QUICK + ["mesh=fsdp=4,tensor=2"])
    plan = build_plan(other, make_mesh(other.mesh))
    checkpointer = Checkpointer(workdir, plan)
    restored = checkpointer.restore()
    checkpointer.close()
    original = Checkpointer(workdir, build_plan(cfg, make_mesh(cfg.mesh))).restore()
    assert int(restored.step) == 8
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(original)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    embed = restored.params["embed"]
    assert embed.sharding.spec == plan.shardings.params["embed"].spec
    assert embed.sharding.mesh.shape["fsdp"] == 4


def test_incompatible_checkpoint_is_named(tmp_path):
    workdir = str(tmp_path / "run")
    train(load_train_config("tiny", QUICK), workdir, stop_after=2)
    with pytest.raises(ValueError, match=r"model\.dim: checkpoint 64, config 32"):
        train(load_train_config("tiny", QUICK + ["model.dim=32"]), workdir)
    with pytest.raises(ValueError, match=r"data\.seq_len: checkpoint 32, config 16"):
        train(load_train_config("tiny", QUICK + ["data.seq_len=16"]), workdir)


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
def _cli(args):
    return [sys.executable, "-m", "mythos_jax.cli", *args]


def _env(cache_dir=None):
    """Subprocess environment. JAX writes cache entries non-atomically, so processes that may
    be killed or that compile concurrently get no persistent cache (``cache_dir=None``); the
    resume test gives its runs a private one that only the uninterrupted run writes to."""
    env = dict(os.environ)
    env.pop("MYTHOS_JAX_CACHE", None)
    if cache_dir is not None:
        env["MYTHOS_JAX_CACHE"] = str(cache_dir)
    return env


def test_resume_after_sigkill_gives_the_same_losses(tmp_path):
    args = ["train", "--config", "tiny"] + [a for o in QUICK for a in ("--set", o)] + [
        "--set", "checkpoint.async_save=true", "--set", "log.every=1"]
    reference, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
    cache = tmp_path / "xla"      # filled by the reference run; the others only read it
    subprocess.run(_cli(args + ["--workdir", reference]), check=True, env=_env(cache),
                   capture_output=True, timeout=300)

    process = subprocess.Popen(_cli(args + ["--workdir", killed]), env=_env(cache),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after = np.random.default_rng(int(time.time())).integers(3, 7)
    deadline = time.time() + 240
    while time.time() < deadline:
        path = os.path.join(killed, "metrics.jsonl")
        if os.path.exists(path) and len(open(path).readlines()) >= kill_after:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before_kill = len(step_lines(killed))
    assert done_before_kill < 8, "the run finished before it could be killed"

    subprocess.run(_cli(args + ["--workdir", killed]), check=True, env=_env(cache),
                   capture_output=True, timeout=300)
    ref, got = step_lines(reference), step_lines(killed)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step]["batch_fingerprint"] == ref[step]["batch_fingerprint"], step
        assert got[step]["loss"] == ref[step]["loss"], step          # bitwise on CPU


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_two_devices(tmp_path):
    args = ["train", "--config", "tiny"] + [a for o in QUICK for a in ("--set", o)]
    env = _env()
    env.pop("XLA_FLAGS", None)
    single = str(tmp_path / "single")
    subprocess.run(_cli(args + ["--workdir", single, "--local-devices", "2"]), check=True,
                   env=env, capture_output=True, timeout=300)
    port, multi = _free_port(), str(tmp_path / "multi")
    workers = [subprocess.Popen(
        _cli(args + ["--workdir", multi, "--local-devices", "1",
                     "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
                     "--process-id", str(i)]),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    outputs = [w.communicate(timeout=300)[0].decode() for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs      # one lock: process 0's
    assert not os.path.exists(os.path.join(multi, "train.lock"))   # and it is released
    one, two = step_lines(single), step_lines(multi)
    assert sorted(two) == list(range(1, 9))
    for step in one:
        assert two[step]["batch_fingerprint"] == one[step]["batch_fingerprint"]
        np.testing.assert_allclose(two[step]["loss"], one[step]["loss"], rtol=1e-6)

    # The 2-device checkpoint restores onto this process's 8 devices (resharded).
    from mythos_jax.cli import main
    assert main(["eval", "--workdir", multi, "--loops", "1,3", "--batches", "1"]) == 0


def test_eval_command_prints_the_depth_curve(tmp_path, capsys):
    from mythos_jax.cli import main
    workdir = str(tmp_path / "run")
    train(load_train_config("tiny", QUICK), workdir, stop_after=2)
    out_json = str(tmp_path / "eval.json")
    assert main(["eval", "--workdir", workdir, "--loops", "1,3", "--batches", "1",
                 "--json", out_json]) == 0
    printed = capsys.readouterr().out
    assert "checkpoint step 2" in printed and "heldout" in printed
    results = json.load(open(out_json))
    assert set(results["heldout"]) == {"1", "3"}
    assert main(["eval", "--workdir", str(tmp_path / "nothing")]) == 2
