"""Where two implementations part: OpenMythos (PyTorch) and mythos-jax traced side by side,
stage by stage (embed, prelude layers, each loop iteration, coda layers, logits).

    report = trace_parity(torch_model)                  # a live OpenMythos, converted here
    report = trace_parity(jax_model=model, loops=8, dtype="bfloat16")
    print(format_report(report)); report["comparisons"][0]["first_over"]
    plot_divergence(report, "divergence.png")
"""

from mythos_jax.interop.trace.capture import StageTrace, jax_trace, torch_trace
from mythos_jax.interop.trace.compare import compare, trace_parity, with_compute_dtype
from mythos_jax.interop.trace.report import format_report, plot_divergence

__all__ = ["StageTrace", "compare", "format_report", "jax_trace", "plot_divergence",
           "torch_trace", "trace_parity", "with_compute_dtype"]
