"""The human-readable ``mythos-jax plan`` report of a :class:`MemoryPlan`."""

from __future__ import annotations

from mythos_jax.plan.compiled import FROM_STORE
from mythos_jax.plan.memory import MemoryPlan
from mythos_jax.plan.topology import GIB


def format_plan(report: MemoryPlan) -> str:
    """The human-readable report: what was planned, how, and the per-device table."""
    mesh = ",".join(f"{a}={n}" for a, n in report.mesh.items() if n > 1) or "1 device"
    depth = ("full backprop" if report.backprop_depth is None
             else f"backprop through the last {report.backprop_depth}")
    if report.method == "compiled":
        how = (f"compiled for {report.topology} by libtpu {report.libtpu} in "
               f"{report.compile_seconds:.0f} s")
    else:
        how = f"analytic estimate, not compiled: {report.reason}"
    rows = [("parameters", report.parameters), ("optimizer state (AdamW)", report.optimizer),
            ("batch", report.batch_bytes), ("temporaries", report.temporaries),
            ("generated code", report.generated_code), ("total", report.total),
            (f"HBM usable ({report.hbm_nominal / GIB:.0f} GiB chip)", report.hbm_usable)]
    verdict = ("fits" if report.fits else "DOES NOT FIT") + (
        f", {(report.hbm_usable - report.total) / GIB:.2f} GiB headroom" if report.fits else "")
    lines = [how,
             f"{report.variant} ({report.n_params / 1e9:.2f}B parameters) on {report.accelerator}: "
             f"{report.chips} chips, {report.hosts} host{'s' if report.hosts > 1 else ''}, "
             f"mesh {mesh}, rules {report.rules}",
             f"training step: batch {report.batch} x {report.seq_len} tokens, {report.loops} loops "
             f"({depth}), {report.dtype} compute, loop_remat={report.loop_remat}, "
             f"moe_impl={report.moe_impl}, attention_impl={report.attention_impl}, AdamW",
             "", f"{'per device':<28}{'GiB':>9}"]
    lines += [f"  {name:<26}{value / GIB:>9.2f}" for name, value in rows]
    lines += ["", verdict]
    if report.compiler_message:
        lines.append(f"compiler: {report.compiler_message}")
    return "\n".join(lines)



def format_arm_plans(experiment: str, reports: list[MemoryPlan]) -> str:
    """One row per arm of ``experiment``'s pod preset: parameters, the program (arms with the
    same one compiled once), GiB per device against the chip's usable HBM, and the verdict."""
    first = reports[0]
    mesh = ",".join(f"{a}={n}" for a, n in first.mesh.items() if n > 1) or "1 device"
    compiled = [r for r in reports if r.method == "compiled"]
    stored = sum(r.figures_from == FROM_STORE for r in compiled)
    estimated = [r for r in reports if r.method != "compiled"]
    how = (f"{len(compiled)} compiled by libtpu {compiled[0].libtpu}"
           f"{f' ({stored} of them by an earlier run, from the store)' if stored else ''}, "
           f"{len(estimated)} estimated" if compiled
           else f"analytic estimates, not compiled: {first.reason}")
    reasons = sorted({r.reason for r in estimated if r.reason} if compiled else ())
    how += f" ({'; '.join(reasons)})" if reasons else ""
    lines = [f"{experiment}: {len(reports)} arms at pod scale on {first.accelerator} "
             f"({first.chips} chips, {first.hosts} host{'s' if first.hosts > 1 else ''}), "
             f"mesh {mesh}; {how}", "",
             f"{'arm':<26}{'params':>8}  {'method':<10}{'program':<14}{'GiB/device':>11}"
             f"{'usable':>8}  fits"]
    for r in reports:
        lines.append(f"{r.variant:<26}{r.n_params / 1e6:>7.0f}M  {r.method:<10}"
                     f"{r.program or '-':<14}{r.total / GIB:>11.2f}{r.hbm_usable / GIB:>8.2f}  "
                     f"{'yes' if r.fits else 'NO'}")
    lines += [f"{r.variant}: {r.compiler_message}" for r in reports if r.compiler_message]
    return "\n".join(lines)
