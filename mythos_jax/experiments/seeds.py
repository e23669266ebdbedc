"""Results over seeds: per-seed values of an arm, and "mean (min-max)" text for tables.

``results["seeds"]`` is ``{"<seed>": {"arms": {name: arm result}}}`` (``harness.run``).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


def seed_values(results: dict, arm: str, pick: Callable[[dict], Any]) -> list:
    """``pick(arm result)`` at every seed that ran ``arm``, in seed order."""
    return [pick(one["arms"][arm]) for one in results["seeds"].values() if arm in one["arms"]]


def spread(values: list[float], fmt: str = ".1%") -> str:
    """"mean (min-max)" of per-seed values (the value alone for one seed)."""
    if len(values) == 1:
        return format(values[0], fmt)
    return (f"{format(float(np.mean(values)), fmt)} ({format(min(values), fmt)}-"
            f"{format(max(values), fmt)})")


def mean_matrix(matrices: list[dict]) -> dict:
    """The element-wise mean of ``{row: {column: value}}`` matrices."""
    return {row: {col: float(np.mean([m[row][col] for m in matrices])) for col in cols}
            for row, cols in matrices[0].items()}


def spread_matrix(matrices: list[dict], row_name: str, fmt: str = ".0%") -> list[str]:
    """A Markdown table of ``{row: {column: value}}`` matrices over seeds, "mean (min-max)"
    cells."""
    first = matrices[0]
    columns = list(next(iter(first.values())))
    lines = [f"| {row_name} \\ loops | " + " | ".join(columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for row in first:
        cells = [spread([m[row][col] for m in matrices], fmt) for col in columns]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines
