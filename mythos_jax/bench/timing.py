"""What every benchmark shares: blocking timed calls, interleaved sides, the CPU share of
other processes, the fp32 matmul peak, where the figures come from, and the JSON file.

    times = interleaved({"jax": jax_step, "torch": torch_step}, iters=10, warmup=1)
    monitor = CpuMonitor(); ...; monitor.other_share()     # 0 = the machine was ours alone
    write_json(result, args.json)
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable

import numpy as np

# Share of the machine's CPU used by other processes above which a benchmark warns.
CONTENTION_WARNING = 0.10


def timed(fn: Callable[[], Any], iters: int, warmup: int) -> list[float]:
    """Seconds of each of ``iters`` calls of ``fn`` (which must block) after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def interleaved(fns: dict[str, Callable[[], Any]], iters: int, warmup: int,
                rounds: int = 5) -> dict[str, list[float]]:
    """``iters`` timed calls of each of ``fns`` (blocking), taken in up to ``rounds``
    alternating chunks (A A B B A A B B ...) so that slow drifts of the machine (clock,
    neighbours) hit every side alike. Each side first gets ``warmup`` untimed calls."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    rounds = max(1, min(rounds, iters))
    chunks = [iters // rounds + (i < iters % rounds) for i in range(rounds)]
    times: dict[str, list[float]] = {name: [] for name in fns}
    for chunk in chunks:
        for name, fn in fns.items():
            settle()
            times[name] += timed(fn, chunk, 0)
    return times


class CpuMonitor:
    """How much of the machine's CPU *other* processes used while something was timed.

    Reads the machine's busy time from ``/proc/stat`` and this process's own CPU time from
    ``os.times()``; ``other_share()`` is (machine busy - own) / (wall x cores), 0 = the
    machine was ours alone, 1 = every core was busy with something else. None where
    ``/proc/stat`` is unavailable. A benchmark on a shared machine is only as good as this.
    """

    def __init__(self) -> None:
        self._start = self._snapshot()

    @staticmethod
    def _snapshot():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal ...: busy = all but idle, iowait
        busy = sum(fields[:3]) + sum(fields[5:8])
        own = os.times()
        return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.perf_counter()

    def other_share(self) -> float | None:
        end = self._snapshot()
        if self._start is None or end is None:
            return None
        busy, own, wall = (b - a for a, b in zip(self._start, end))
        if wall <= 0:
            return None
        return min(1.0, max(0.0, (busy - own) / (wall * (os.cpu_count() or 1))))


def wait_for_idle(max_wait_s: float, threshold: float = CONTENTION_WARNING,
                  window_s: float = 5.0, log: Callable[[str], None] | None = None
                  ) -> float | None:
    """Wait (at most ``max_wait_s``) until other processes use under ``threshold`` of the CPU
    over a ``window_s`` window; returns the last share seen (None: not measurable here)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        monitor = CpuMonitor()
        time.sleep(window_s)
        share = monitor.other_share()
        if share is None or share < threshold or time.monotonic() >= deadline:
            return share
        if log:
            log(f"machine busy ({100 * share:.0f}% CPU used by other processes), waiting ...")


def config_override_arg(text: str) -> tuple[str, Any]:
    """argparse ``type=`` for ``--set FIELD=VALUE`` (see ``MythosConfig``'s parse_override)."""
    import argparse

    from mythos_jax.config import parse_override

    try:
        return parse_override(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def write_json(result: dict[str, Any], path: str | None) -> None:
    """Write a benchmark's figures to ``path`` (if given) and say so."""
    if path:
        import json

        with open(path, "w") as f:
            json.dump(result, f, indent=2, sort_keys=True)
        print(f"figures written to {path}")


def settle() -> None:
    """Let the other library's worker threads go idle before timing (2-core machines)."""
    time.sleep(0.1)


# ============================================================================ matmul peak
def measure_matmul_peak(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5) -> dict:
    """fp32 matmul throughput of this machine, FLOP/s: ``n x n @ n x n`` under ``jax.jit`` and
    with ``torch.matmul``, median of ``repeats`` calls per size, best size per library.
    ``peak_flops`` is the larger of the two: the physical limit the model fractions refer to."""
    import jax
    import jax.numpy as jnp
    import torch

    jax_best, torch_best, per_size = 0.0, 0.0, {}
    for n in sizes:
        flops = 2.0 * n ** 3
        rng = np.random.default_rng(n)
        a_np = rng.standard_normal((n, n), dtype=np.float32)
        b_np = rng.standard_normal((n, n), dtype=np.float32)

        a, b = jnp.asarray(a_np), jnp.asarray(b_np)
        matmul = jax.jit(jnp.matmul)
        jax_s = statistics.median(timed(lambda: matmul(a, b).block_until_ready(), repeats, 2))
        settle()
        ta, tb = torch.from_numpy(a_np), torch.from_numpy(b_np)
        with torch.no_grad():
            torch_s = statistics.median(timed(lambda: torch.matmul(ta, tb), repeats, 2))
        settle()
        per_size[str(n)] = {"jax_flops": flops / jax_s, "torch_flops": flops / torch_s}
        jax_best = max(jax_best, flops / jax_s)
        torch_best = max(torch_best, flops / torch_s)
    return {"jax_matmul_flops": jax_best, "torch_matmul_flops": torch_best,
            "peak_flops": max(jax_best, torch_best), "sizes": list(sizes), "per_size": per_size}


def machine_info() -> dict[str, Any]:
    """Where the figures come from: CPU, core count, thread counts, library versions."""
    import flax
    import jax
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "jax_backend": jax.default_backend(), "jax": jax.__version__,
            "flax": flax.__version__, "torch": torch.__version__,
            "python": platform.python_version()}
