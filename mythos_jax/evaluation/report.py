"""What ``mythos-jax lm-eval`` reports: a task x depth table of each task's main metric, every
metric as JSON, and a plot of the main metric against test-time loops.

A :class:`DepthResult` is one ``lm_eval.simple_evaluate`` at one depth; metric keys are
lm-eval's (``"acc,none"``: metric, filter).
"""

from __future__ import annotations

from typing import NamedTuple

from mythos_jax import paths
from mythos_jax.loops import LoopSpec


class DepthResult(NamedTuple):
    spec: LoopSpec                          # a static count, with an exit rule if any
    metrics: dict[str, dict[str, float]]    # task -> {"acc,none": 0.25, ...}
    main: dict[str, str]                    # task -> its main metric key
    mean_loops: dict[str, float]            # task -> loops run per request


def depth_result(spec: LoopSpec, results: dict, loops_used: dict[str, list[float]]
                 ) -> DepthResult:
    """A DepthResult from ``simple_evaluate``'s output and the model's ``loops_used``."""
    metrics = {task: {key: float(value) for key, value in values.items()
                      if "," in key and isinstance(value, (int, float))}
               for task, values in results["results"].items()}
    main = {}
    for task, values in metrics.items():
        first = next(iter(results["higher_is_better"].get(task, {})), None)
        main[task] = next((key for key in values if key.split(",")[0] == first),
                          next(iter(values)))
    mean_loops = {task: sum(used) / len(used) for task, used in loops_used.items() if used}
    return DepthResult(spec, metrics, main, mean_loops)


def depth_label(spec: LoopSpec) -> str:
    """``loops=4``, or ``exit=kl<=32`` for an exit rule with its bound."""
    return f"loops={spec.count}" if spec.exit is None else f"exit={spec.exit}<={spec.count}"


def table(results: list[DepthResult]) -> str:
    """One row per task: its main metric at each depth, and the mean loops an exit rule
    used."""
    exits = [r for r in results if r.spec.exit is not None]
    header = (["task", "metric"] + [depth_label(r.spec) for r in results]
              + [f"loops used ({r.spec.exit})" for r in exits])
    rows = [header]
    for task, key in results[0].main.items():
        rows.append([task, key.split(",")[0]]
                    + [f"{r.metrics[task][key]:.4f}" for r in results]
                    + [f"{r.mean_loops.get(task, float('nan')):.2f}" for r in exits])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in rows)


def as_json(results: list[DepthResult]) -> dict:
    """Every metric at every depth: ``{"depths": [{"depth", "loops", "exit", "threshold",
    "metrics", "main", "mean_loops"}]}``."""
    return {"depths": [{"depth": depth_label(r.spec), "loops": r.spec.count,
                        "exit": None if r.spec.exit is None else str(r.spec.exit),
                        "threshold": None if r.spec.exit is None else r.spec.threshold,
                        "metrics": r.metrics, "main": r.main, "mean_loops": r.mean_loops}
                       for r in results]}


def plot(results: list[DepthResult], path, title: str) -> str:
    """One panel per task: its main metric against loops (log2 x; an exit rule's point at the
    mean loops it used), as a PNG at ``path`` (local or a bucket URL); returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results[0].main)
    fixed = [r for r in results if r.spec.exit is None]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        key = results[0].main[task]
        ax.plot([r.spec.count for r in fixed], [r.metrics[task][key] for r in fixed],
                marker="o", label="fixed loops")
        for r in results:
            if r.spec.exit is not None and task in r.mean_loops:
                ax.plot([r.mean_loops[task]], [r.metrics[task][key]], marker="*",
                        markersize=12, linestyle="", label=depth_label(r.spec))
        ax.set_xscale("log", base=2)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("test-time loops")
        ax.set_ylabel(key.split(",")[0])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return paths.write_png(fig, path)
