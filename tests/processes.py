"""Helpers for tests that run ``mythos-jax`` in subprocesses: the command line, the
environment, a free loopback port, and a run's logged steps."""

import os
import socket
import sys

from mythos_jax.train.trainer import read_metrics


def cli(args: list[str]) -> list[str]:
    """``mythos-jax ARGS`` as this interpreter runs it."""
    return [sys.executable, "-m", "mythos_jax.cli", *args]


def subprocess_env(cache_dir=None) -> dict[str, str]:
    """Subprocess environment. JAX writes cache entries non-atomically, so processes that may
    be killed or that compile concurrently get no persistent cache (``cache_dir=None``)."""
    env = dict(os.environ)
    env.pop("MYTHOS_JAX_CACHE", None)
    if cache_dir is not None:
        env["MYTHOS_JAX_CACHE"] = str(cache_dir)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_lines(workdir) -> dict[int, dict]:
    """The training records of ``<workdir>/metrics.jsonl`` by step."""
    return {line["step"]: line for line in read_metrics(workdir) if "eval" not in line}


def committed_steps(workdir) -> list[int]:
    """The checkpoint steps Orbax has committed (renamed from their temporary directories)."""
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(
        directory) else []
