"""Where the time of one call goes, by kind of operation, for a compiled JAX callable and for
a PyTorch callable, in the same categories so that the two can be read side by side.

JAX: the call runs under ``jax.profiler.trace``; the trace is read back with
``jax.profiler.ProfileData`` and every executed HLO instruction is classified from the
compiled module's text (its opcode; for a fusion, the instructions of the computation it
calls). Container instructions (``while``, ``conditional``, ``call``) are not counted: their
bodies' instructions are. ``runtime`` is the wall time not covered by any instruction
(dispatch between thunks, the host side of the call). The phase of an instruction comes from
its ``op_name``: ``transpose(...)`` is the backward pass, ``jvp(...)`` the forward pass of a
gradient, anything else the rest (a plain forward, the optimizer update, the loss).

PyTorch: ``torch.profiler`` self CPU time per ``aten::`` op, classified by name; ``runtime``
is the wall time minus the ops' self time (Python, autograd bookkeeping, the dispatcher).
Where XLA ran instructions side by side on its threads, their summed time exceeds the wall;
the categories are then scaled to the wall (``op_ms_summed`` keeps the sum).

    compiled = jax.jit(f).lower(*args).compile()
    jax_side = jax_profile(lambda: compiled(*args), compiled.as_text(), reps=3)
    torch_side = torch_profile(torch_fn, reps=3)
    print(format_profiles({"open-mythos": torch_side, "mythos-jax": jax_side}))
"""

from __future__ import annotations

import collections
import glob
import re
import tempfile
import time
from typing import Any, Callable

CATEGORIES = ("matmul", "gather/scatter", "sort/top-k", "elementwise", "copy/layout",
              "runtime")

_CONTAINERS = {"while", "conditional", "call"}
_BY_OPCODE = {
    "dot": "matmul", "convolution": "matmul",
    "gather": "gather/scatter", "scatter": "gather/scatter", "dynamic-slice": "gather/scatter",
    "dynamic-update-slice": "gather/scatter", "select-and-scatter": "gather/scatter",
    "sort": "sort/top-k", "topk": "sort/top-k",
    "copy": "copy/layout", "transpose": "copy/layout", "bitcast": "copy/layout",
    "reshape": "copy/layout", "broadcast": "copy/layout", "concatenate": "copy/layout",
    "slice": "copy/layout", "pad": "copy/layout", "iota": "copy/layout",
    "copy-start": "copy/layout", "copy-done": "copy/layout", "tuple": "copy/layout",
    "get-tuple-element": "copy/layout", "parameter": "copy/layout", "constant": "copy/layout",
}
# A fusion is classified by the first of these kinds found among its instructions.
_FUSION_PRECEDENCE = ("matmul", "sort/top-k", "gather/scatter", "elementwise", "copy/layout")

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (?:\(.*?\)|\S+) ([a-z][\w\-]*)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")


def _opcode_kind(opcode: str) -> str:
    return _BY_OPCODE.get(opcode, "elementwise")


def hlo_instruction_kinds(hlo_text: str) -> dict[str, tuple[str, str]]:
    """{instruction name: (category, phase)} for every instruction of a compiled HLO module;
    category ``None`` for containers (while/conditional/call). Phase: ``backward``,
    ``forward`` (of a gradient) or ``rest``."""
    opcodes: dict[str, list[str]] = collections.defaultdict(list)   # computation -> opcodes
    lines: list[tuple[str, str, str]] = []                          # (name, opcode, line)
    computation = ""
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and " = " not in line:
            computation = header.group(1)
            continue
        match = _INSTRUCTION.match(line)
        if match:
            opcodes[computation].append(match.group(2))
            lines.append((match.group(1), match.group(2), line))
    kinds = {}
    for name, opcode, line in lines:
        if opcode in _CONTAINERS:
            kinds[name] = (None, "rest")
            continue
        if opcode == "fusion":
            called = re.search(r"calls=%?([\w.\-]+)", line)
            inner = {_opcode_kind(o) for o in opcodes.get(called.group(1) if called else "", [])}
            kind = next((k for k in _FUSION_PRECEDENCE if k in inner), "elementwise")
        elif opcode == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', line)
            kind = ("matmul" if target and re.search(r"matmul|gemm|dot", target.group(1), re.I)
                    else "elementwise")
        else:
            kind = _opcode_kind(opcode)
        op_name = re.search(r'op_name="([^"]*)"', line)
        op_name = op_name.group(1) if op_name else ""
        phase = ("backward" if "transpose(" in op_name else
                 "forward" if "jvp(" in op_name else "rest")
        kinds[name] = (kind, phase)
    return kinds


def _trace_events(fn: Callable[[], Any], reps: int) -> tuple[list, float]:
    """(XLA executor events of ``reps`` calls of fn, wall seconds of those calls)."""
    import jax

    directory = tempfile.mkdtemp(prefix="mythos-profile-")
    with jax.profiler.trace(directory):
        start = time.perf_counter()
        for _ in range(reps):
            jax.block_until_ready(fn())
        wall = time.perf_counter() - start
    path = sorted(glob.glob(f"{directory}/**/*.xplane.pb", recursive=True))[-1]
    data = jax.profiler.ProfileData.from_file(path)
    events = [event for plane in data.planes for line in plane.lines
              if line.name.startswith("tf_XLA") for event in line.events]
    return events, wall


def jax_profile(fn: Callable[[], Any], hlo_text: str, reps: int = 3) -> dict[str, Any]:
    """Milliseconds per call of ``fn`` (a compiled executable called on fixed arguments, run
    once before to warm up) by category and by (phase, category); ``hlo_text`` is that
    executable's ``as_text()``. Also the wall ms per call and the unclassified instructions."""
    import jax

    kinds = hlo_instruction_kinds(hlo_text)
    jax.block_until_ready(fn())                                    # warm-up, not traced
    events, wall = _trace_events(fn, reps)
    by_kind: collections.Counter = collections.Counter()
    by_phase: collections.Counter = collections.Counter()
    unknown: set[str] = set()
    for event in events:
        name = event.name
        if name.startswith("end: ") or "::" in name:      # runtime events (Executor::...)
            continue
        kind, phase = kinds.get(name, ("elementwise", "rest"))
        if name not in kinds:
            unknown.add(name)
        if kind is None:
            continue
        ms = event.duration_ns / 1e6 / reps
        by_kind[kind] += ms
        by_phase[(phase, kind)] += ms
    out = _by_category(by_kind, wall / reps * 1e3)
    out["by_phase"] = {f"{phase}/{kind}": float(ms) for (phase, kind), ms in
                       sorted(by_phase.items())}
    out["unclassified"] = sorted(unknown)
    return out


_TORCH_KINDS = (
    (re.compile(r"^aten::(mm|addmm|bmm|baddbmm|addbmm|matmul|linear|_?mkldnn.*|einsum)$"),
     "matmul"),
    (re.compile(r"index|gather|scatter|nonzero|masked_select|embedding|where|take"),
     "gather/scatter"),
    (re.compile(r"sort|topk|argsort|kthvalue"), "sort/top-k"),
    (re.compile(r"copy|clone|contiguous|cat|stack|view|reshape|permute|transpose|expand|"
                r"slice|select|unsqueeze|squeeze|split|chunk|empty|zeros|ones|full|t$|"
                r"as_strided|narrow|unbind|flatten|_to_copy|to$|detach|alias|lift|fill"),
     "copy/layout"),
)


def torch_category(op: str) -> str:
    """The category of a ``torch.profiler`` op name (``aten::...``)."""
    for pattern, kind in _TORCH_KINDS:
        if pattern.search(op):
            return kind
    return "elementwise"


def torch_profile(fn: Callable[[], Any], reps: int = 3) -> dict[str, Any]:
    """Milliseconds per call of a PyTorch callable by category (self CPU time of each op),
    after one warm-up call; ``runtime`` is what the ops' self time does not cover."""
    import torch

    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        wall = time.perf_counter() - start
    by_kind: collections.Counter = collections.Counter()
    for event in prof.key_averages():
        if event.key.startswith("aten::") or event.key.startswith("mkldnn"):
            by_kind[torch_category(event.key)] += event.self_cpu_time_total / 1e3 / reps
    return _by_category(by_kind, wall / reps * 1e3)


def _by_category(by_kind, wall_ms: float) -> dict[str, Any]:
    """Categories in ms of the wall time. XLA:CPU runs independent instructions on several
    threads at once, so their summed time can exceed the wall: then every category is scaled
    by wall / summed (``op_ms_summed`` keeps the sum) and ``runtime`` is 0."""
    ops = sum(by_kind.values())
    scale = min(1.0, wall_ms / ops) if ops else 1.0
    categories = {k: float(by_kind.get(k, 0.0)) * scale for k in CATEGORIES if k != "runtime"}
    categories["runtime"] = max(wall_ms - ops, 0.0)
    return {"wall_ms": wall_ms, "ms": categories, "op_ms_summed": ops}


def format_profiles(sides: dict[str, dict[str, Any]], matmul_flops: float | None = None,
                    peak_flops: float | None = None) -> str:
    """A table: ms per call and share of the wall time by category, one column pair per side.
    With ``matmul_flops`` (the call's matmul FLOPs) and ``peak_flops``: each side's matmul
    rate as a fraction of the peak."""
    names = list(sides)
    head = f"{'':16s}" + "".join(f"{n:>14s} ms {'share':>6s}" for n in names)
    rows = [head, "-" * len(head)]
    for kind in CATEGORIES:
        cells = "".join(f"{s['ms'][kind]:17.2f} {100 * s['ms'][kind] / s['wall_ms']:5.1f}%"
                        for s in sides.values())
        rows.append(f"{kind:16s}{cells}")
    rows.append(f"{'wall':16s}" + "".join(f"{s['wall_ms']:17.2f} {'':6s}"
                                           for s in sides.values()))
    if matmul_flops and peak_flops:
        rows.append(f"{'matmul % peak':16s}" + "".join(
            f"{100 * matmul_flops / (s['ms']['matmul'] / 1e3) / peak_flops:16.1f}% {'':6s}"
            if s["ms"]["matmul"] else f"{'-':>17s} {'':6s}" for s in sides.values()))
    return "\n".join(rows)
