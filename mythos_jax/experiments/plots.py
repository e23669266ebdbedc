"""Figures and Markdown tables shared by the experiments (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from typing import Callable


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def accuracy_grid(matrices: dict[str, dict[str, dict[str, float]]], path: str,
                  title: str) -> str:
    """One panel per arm: accuracy against test loops (log x), one line per row key (hops)."""
    plt = _pyplot()
    columns = min(len(matrices), 2) or 1
    rows = math.ceil(len(matrices) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.6 * rows), squeeze=False)
    for ax, (name, matrix) in zip(axes.flat, matrices.items()):
        for key, by_loops in matrix.items():
            loops = [int(t) for t in by_loops]
            ax.plot(loops, list(by_loops.values()), marker="o", markersize=3, label=f"{key}")
        ax.set_xscale("log", base=2)
        ax.set_title(name)
        ax.set_xlabel("test-time loops")
        ax.set_ylabel("exact match")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(title="hops", fontsize=7, ncol=2)
    for ax in list(axes.flat)[len(matrices):]:
        ax.axis("off")
    return _save(fig, path, title)


def curves(series: dict[str, tuple[list[float], list[float]]], path: str, title: str,
           xlabel: str, ylabel: str, logx: bool = False,
           fitted: dict[str, Callable[[float], float]] | None = None) -> str:
    """Lines ``name: (x, y)`` on one axis, with optional fitted curves drawn dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, (x, y) in series.items():
        line, = ax.plot(x, y, marker="o", markersize=3, label=name)
        if fitted and name in fitted:
            grid = [x[0] + (x[-1] - x[0]) * i / 200 for i in range(201)]
            ax.plot(grid, [fitted[name](g) for g in grid], "--", color=line.get_color(),
                    alpha=0.6)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path, title)


def panels(series: dict[str, dict[str, tuple[list[float], list[float]]]], path: str,
           title: str, xlabel: str, logy: set[str] = frozenset()) -> str:
    """One panel per quantity (``{quantity: {name: (x, y)}}``), lines per name."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.8), squeeze=False)
    for ax, (quantity, lines) in zip(axes.flat, series.items()):
        for index, (name, (x, y)) in enumerate(lines.items()):
            ax.plot(x, y, label=name, linewidth=1, color=plt.cm.tab20(index % 20))
        if quantity in logy:
            ax.set_yscale("log")
        ax.set_title(quantity)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=6)
    return _save(fig, path, title)


def markdown_matrix(matrix: dict[str, dict[str, float]], row_name: str,
                    percent: bool = False) -> list[str]:
    """A Markdown table: rows = ``matrix`` keys, columns = the inner keys."""
    columns = list(next(iter(matrix.values())))
    lines = [f"| {row_name} \\ loops | " + " | ".join(columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for key, by_column in matrix.items():
        cells = [f"{v:.0%}" if percent else f"{v:.4f}" for v in by_column.values()]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines


def _save(fig, path: str, title: str) -> str:
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _pyplot().close(fig)
    return path


def scatter_panels(series: dict[str, dict[str, tuple[list[float], list[float]]]], path: str,
                   title: str, ylabel: str) -> str:
    """One panel per x quantity (``{quantity: {name: (x, y)}}``), log x, labelled points."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 4.2), squeeze=False)
    for ax, (quantity, points) in zip(axes.flat, series.items()):
        for index, (name, (x, y)) in enumerate(points.items()):
            ax.scatter(x, y, color=plt.cm.tab10(index % 10), label=name)
            for xi, yi in zip(x, y):
                ax.annotate(name, (xi, yi), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(quantity)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=6)
    return _save(fig, path, title)


def heatmaps(matrices: dict, path: str, title: str, xlabel: str, ylabel: str,
             columns: list[str], colorbar: str) -> str:
    """One panel per name: a (rows, columns) matrix as an image (rows up the y axis, columns
    labelled ``columns`` along x), one colour scale from 0 to the largest value of all."""
    plt = _pyplot()
    top = max(float(max(map(max, m))) for m in matrices.values())
    width = (1.5 + 0.35 * len(columns)) * len(matrices)
    fig, axes = plt.subplots(1, len(matrices), figsize=(width, 3.6), squeeze=False)
    for ax, (name, matrix) in zip(axes.flat, matrices.items()):
        image = ax.imshow(matrix, aspect="auto", origin="lower", vmin=0, vmax=top,
                          interpolation="nearest")
        ax.set_xticks(range(len(columns)), columns, fontsize=7)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        fig.colorbar(image, ax=ax, label=colorbar)
    return _save(fig, path, title)
