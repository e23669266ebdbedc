"""Preemption of a multi-host run, as it happens on a pod: two local processes play two hosts
(``--coordinator-address 127.0.0.1:PORT --num-processes 2 --process-id I``); SIGTERM reaches
one host; then both, 0.3 s apart, the first while a checkpoint is being written. Each time both
processes save the same checkpoint and exit with ``PREEMPTED_EXIT`` within a bounded
time, and the rerun continues at the next step: the whole run logs every step once, with the
batches and losses of an uninterrupted run. That rerun also meets a transient read error on one
host only: both hosts retry together (process 0 reports the failure "on another process") and
nothing is set aside."""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from mythos_jax.parallel.mesh import make_mesh
from mythos_jax.train import trainer
from mythos_jax.train.config import load_train_config
from mythos_jax.train.trainer import PREEMPTED_EXIT, read_metrics
from processes import cli, committed_steps, free_port, step_lines, subprocess_env

STEPS = 120
OVERRIDES = [f"steps={STEPS}", "checkpoint.every=1000", "log.every=1", "log.progress=false",
             "log.tensorboard=false", "eval.loops=[1]", "eval.batches=1", "log.peak_flops=1e11"]
EXIT_WITHIN = 120       # seconds from the last signal to both processes' exit


# ``mythos-jax`` whose process 1 fails its first two checkpoint reads with a transient error
FLAKY_READS_ON_HOST_1 = """
import sys, jax
from mythos_jax.checkpoints import training
read, failures = training.Checkpointer.saved_config, [2]
def flaky(self, step):
    if jax.process_index() == 1 and failures[0]:
        failures[0] -= 1
        raise ConnectionError("injected: storage unreachable")
    return read(self, step)
training.Checkpointer.saved_config, training.RETRY_SECONDS = flaky, 0.05
from mythos_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_hosts(workdir, overrides, logs, flaky_reads=False):
    """Two processes of one run, one CPU device each, their output to ``logs``."""
    port = free_port()
    env = {**subprocess_env(), "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    sets = [a for o in overrides for a in ("--set", o)]
    args = ["train", "--config", "tiny", "--workdir", str(workdir), *sets,
            "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2"]
    command = [sys.executable, "-c", FLAKY_READS_ON_HOST_1] if flaky_reads else cli([])
    return [subprocess.Popen(command + args + ["--process-id", str(i), "--local-devices", "1"],
                             env=env, stdout=open(logs[i], "w"), stderr=subprocess.STDOUT)
            for i in range(2)]


def wait_until(ready, hosts, logs, timeout=300):
    deadline = time.monotonic() + timeout
    while not ready():
        for host, log in zip(hosts, logs):
            assert host.poll() is None, open(log).read()           # ended too early
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def logged_step(workdir) -> int:
    steps = step_lines(workdir) if os.path.exists(os.path.join(workdir, "metrics.jsonl")) else {}
    return max(steps, default=0)


def saving(workdir) -> bool:
    """A checkpoint is being written (Orbax's temporary directory exists)."""
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and any("tmp" in n for n in os.listdir(directory))


def preempt(workdir, tmp_path, name, ready, signals, overrides=OVERRIDES) -> int:
    """Run both hosts until ``ready()``, send ``signals`` ((process id, delay before) pairs);
    check that both exit with PREEMPTED_EXIT in time, after the one checkpoint they wrote
    together at the step they stopped at (the newest, and the last step logged); return it."""
    logs = [tmp_path / f"{name}-{i}.log" for i in range(2)]
    hosts = start_hosts(workdir, overrides, logs)
    try:
        wait_until(ready, hosts, logs)
        for process_id, delay in signals:
            time.sleep(delay)
            hosts[process_id].send_signal(signal.SIGTERM)
        codes = [host.wait(timeout=EXIT_WITHIN) for host in hosts]
    finally:
        for host in hosts:
            host.kill() if host.poll() is None else None
    outputs = [open(log).read() for log in logs]
    assert codes == [PREEMPTED_EXIT] * 2, "\n".join(outputs)
    stops = re.findall(r"stopped at step (\d+) \(preempted\)", outputs[0])   # process 0 logs
    assert len(stops) == 1, "\n".join(outputs)
    step = int(stops[0])
    assert committed_steps(workdir)[-1] == step and logged_step(workdir) == step
    return step


def test_sigterm_on_one_host_then_on_both_at_different_steps_during_a_save(tmp_path,
                                                                           monkeypatch):
    work = tmp_path / "run"
    first = preempt(work, tmp_path, "one-host", lambda: logged_step(work) >= 5, [(1, 0)])
    second = preempt(work, tmp_path, "both-hosts",
                     lambda: logged_step(work) > first + 3 and saving(work),
                     [(0, 0), (1, 0.3)], OVERRIDES + ["checkpoint.every=3"])
    assert second > first

    logs = [tmp_path / f"last-{i}.log" for i in range(2)]
    hosts = start_hosts(work, OVERRIDES, logs, flaky_reads=True)
    assert [host.wait(timeout=600) for host in hosts] == [0, 0], open(logs[0]).read()
    output = open(logs[0]).read()
    assert f"resumed from {work}/checkpoints at step {second}" in output
    assert output.count(f"warning: reading checkpoint step {second} at {work}/checkpoints/"
                        f"{second} failed (failed on another process); retrying") == 2, output
    assert not (work / "damaged_checkpoints").exists()
    assert [r["step"] for r in read_metrics(work) if "eval" not in r] == list(range(1, STEPS + 1))

    # The same run uninterrupted, one process on two devices: the same batches and losses
    monkeypatch.setattr(trainer, "make_mesh", lambda spec: make_mesh(spec, jax.devices()[:2]))
    reference = tmp_path / "reference"
    trainer.train(load_train_config("tiny", OVERRIDES), str(reference))
    ours, theirs = step_lines(work), step_lines(reference)
    for step in range(1, STEPS + 1):
        assert ours[step]["batch_fingerprint"] == theirs[step]["batch_fingerprint"], step
        np.testing.assert_allclose(ours[step]["loss"], theirs[step]["loss"], rtol=1e-6)
