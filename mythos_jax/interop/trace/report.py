"""``trace_parity``'s report as text tables and as a plot of the divergence per loop."""

from __future__ import annotations

from typing import Any

HEADER = (f"{'stage':<11} {'max|diff|':>9} {'rel.diff':>9} {'cosine':>10} {'top-k':>6} "
          f"{'halted':>6} {'ACT w|d|':>9} {'dh/h ref':>9} {'dh/h oth':>9}")


def format_report(report: dict[str, Any]) -> str:
    """One table per comparison: a row per stage, the first stage over the tolerance and the
    ACT halting agreement under it."""
    ids = "x".join(str(n) for n in report["ids_shape"])
    blocks = []
    for comparison in report["comparisons"]:
        lines = [f"{comparison['name']}: {report['attn_type']}, {report['loops']} loops, "
                 f"ids {ids}; tolerance {comparison['tolerance']:g} on rel.diff",
                 HEADER]
        lines += [_format_row(row) for row in comparison["rows"]]
        first = comparison["first_over"]
        if first is None:
            lines.append("first stage over tolerance: none")
        else:
            row = next(r for r in comparison["rows"] if r["stage"] == first)
            lines.append(f"first stage over tolerance: {first} (rel.diff {row['rel_diff']:.2e})")
        lines.append(f"ACT halting agreement: {comparison['halting_agreement']:.1%} of "
                     f"positions halt at the same loop (reference ran "
                     f"{comparison['reference_loops']} loops, other {comparison['other_loops']})")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _format_row(row: dict[str, Any]) -> str:
    if "missing" in row:
        return f"{row['stage']:<11} (not run by the {row['missing']}: every position halted)"
    text = (f"{row['stage']:<11} {row['max_abs_diff']:>9.2e} {row['rel_diff']:>9.2e} "
            f"{row['cosine']:>10.7f}")
    if "topk_agreement" in row:
        text += (f" {row['topk_agreement']:>6.1%} {row['halted_agreement']:>6.1%} "
                 f"{row['act_weight_max_diff']:>9.2e} {row['delta_reference']:>9.2e} "
                 f"{row['delta_other']:>9.2e}")
    return text + ("  <" if row["over"] else "")


def plot_divergence(report: dict[str, Any], path: str) -> None:
    """Relative difference of h per loop iteration (log scale), one line per comparison,
    written to ``path`` (PNG, matplotlib's Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for comparison in report["comparisons"]:
        loops = [r for r in comparison["rows"]
                 if r["stage"].startswith("loop ") and "missing" not in r]
        ax.plot([int(r["stage"].split()[1]) for r in loops],
                [max(r["rel_diff"], 1e-12) for r in loops], marker="o",
                label=comparison["name"])
    ax.set(yscale="log", xlabel="loop iteration t", ylabel="||h - h_ref|| / ||h_ref||",
           title=f"divergence per loop ({report['dtype']}, {report['attn_type']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
