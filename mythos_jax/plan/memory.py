"""Per-device bytes of the trainer's own step on a TPU slice: compiled, or estimated.

    spec = PlanSpec("mythos_1b", {"dtype": "bfloat16"}, batch=4, seq_len=2048, loops=16)
    report = plan_memory(spec, accelerator("v4-8"), "fsdp=4")     # MemoryPlan

The step is ``mythos_jax.train.step``'s (``build_plan`` + ``make_train_step(plan).jitted``,
lowered under ``plan.context()``) for the ``TrainConfig`` of :meth:`PlanSpec.train_config`:
the trainer's optimizer, loss terms and router-bias update, the loop count drawn at run time
and bounded by ``loops``. It is compiled for the slice's topology on this host through
``jax.experimental.topologies`` and libtpu (MaxText's ``train_compile`` does the same): no TPU
is needed, only the ``libtpu`` wheel. The compiler's memory analysis gives the temporaries;
parameters, optimizer state and batch come from the shardings. Without libtpu (or with
``analytic``) the temporaries are an analytic estimate (:func:`analytic_temporaries`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
from typing import Any, Callable

from mythos_jax.plan.compiled import FIGURES, CompilerFigures, program_key
from mythos_jax.plan.topology import GIB, Accelerator, topology_devices


# ---------------------------------------------------------------------------- what is planned
@dataclasses.dataclass(frozen=True)
class PlanSpec:
    """One training step to fit: ``variant`` with MythosConfig field overrides ``model``, a
    global batch of ``batch`` sequences of ``seq_len`` tokens, a run-time loop count bounded by
    ``loops`` (gradient through the last ``backprop_depth``, or all when None), and the
    logical-axis ``rules`` preset."""
    variant: str
    model: dict
    batch: int
    seq_len: int
    loops: int
    backprop_depth: int | None = None
    rules: str = "default"
    train: Any = None       # a whole TrainConfig (see ``of_train_config``)

    @classmethod
    def of_train_config(cls, name: str, fields: dict) -> "PlanSpec":
        """The step of the TrainConfig built from ``fields`` (an experiment's arm, see
        ``train_config_fields``) as it trains, called ``name``: its loops, optimizer and loss
        terms, computing in bfloat16 unless ``model.dtype`` says otherwise (as the trainer
        does on a TPU). Planning reads no data: a corpus on disk (``data.paths``) is replaced
        by byte-level data of the same shape, so ``model.vocab_size`` must then be set
        (ValueError otherwise)."""
        from mythos_jax.train.config import TrainConfig

        fields = {**fields, "model": {"dtype": "bfloat16", **fields.get("model", {})}}
        data = fields.get("data", {})
        if data.get("paths"):
            if "vocab_size" not in fields.get("model", {}):
                raise ValueError(f"{name}: model.vocab_size must be set to plan a config whose "
                                 f"vocabulary comes from its corpus (data.paths)")
            fields = {**fields, "data": {"source": "stdlib", **{
                k: data[k] for k in ("seq_len", "batch_size", "seed") if k in data}}}
        cfg = TrainConfig.from_dict(fields)
        return cls(name, dict(cfg.model), batch=cfg.data.batch_size, seq_len=cfg.data.seq_len,
                   loops=cfg.loops.max_loops, backprop_depth=cfg.loops.backprop_depth,
                   rules=cfg.rules, train=cfg)

    def train_config(self):
        """The TrainConfig of this step: ``train`` when given; else the trainer's optimizer
        and loss defaults, and the model keeps the variant's ``dtype`` unless ``model`` sets
        one (so that the mesh's platform does not choose it) and the variant's
        ``vocab_size``, raised to the byte-level data's when smaller (the trainer refuses a
        vocabulary below its data's)."""
        from mythos_jax.train.config import TrainConfig

        if self.train is not None:
            return self.train
        from mythos_jax.train.data import vocab_size
        from mythos_jax.train.data_config import StdlibData
        from mythos_jax.variants import get_variant

        variant = get_variant(self.variant)
        data = {"seq_len": self.seq_len, "batch_size": self.batch}
        vocab = max(variant.vocab_size, vocab_size(StdlibData(**data)))
        return TrainConfig.from_dict({
            "rules": self.rules, "data": data,
            "model": {"variant": self.variant, "vocab_size": vocab, "dtype": str(variant.dtype),
                      **self.model},
            "loops": {"schedule": "uniform", "lo": self.loops, "hi": self.loops,
                      "max_loops": self.loops, "backprop_depth": self.backprop_depth}})


def abstract_batch(spec: PlanSpec) -> dict:
    """The trainer's batch as ShapeDtypeStructs: inputs, targets (int32) and loss_mask
    (float32), each (B, T)."""
    import jax
    import jax.numpy as jnp

    tokens = jax.ShapeDtypeStruct((spec.batch, spec.seq_len), jnp.int32)
    return {"inputs": tokens, "targets": tokens,
            "loss_mask": jax.ShapeDtypeStruct(tokens.shape, jnp.float32)}


def lower_train_step(plan, batch: dict):
    """The trainer's step for ``plan`` (a ``TrainPlan``) lowered for its mesh and rules (built
    outside them: its eager setup must not run on compile-only devices)."""
    from mythos_jax.train.step import make_train_step

    step = make_train_step(plan)
    with plan.context():
        return step.jitted.lower(plan.abstract_state, batch)


# ---------------------------------------------------------------------------- memory
@dataclasses.dataclass
class MemoryPlan:
    """Per-device bytes of one training step on one slice; ``method`` is "compiled" (libtpu's
    memory analysis) or "analytic" (an estimate, ``reason`` says why)."""
    variant: str
    accelerator: str
    topology: str
    chips: int
    hosts: int
    mesh: dict[str, int]
    rules: str
    batch: int
    seq_len: int
    loops: int
    backprop_depth: int | None
    dtype: str
    loop_remat: str
    moe_impl: str
    attention_impl: str
    n_params: int
    method: str
    reason: str | None
    parameters: int
    optimizer: int
    batch_bytes: int
    temporaries: int
    generated_code: int
    hbm_usable: int
    hbm_nominal: int
    compiler_message: str | None = None
    compile_seconds: float | None = None
    program: str | None = None            # its store key's start: program (constants aside),
                                          # slice and compiler
    libtpu: str | None = None
    flops: float | None = None            # the compiled step's cost analysis, per device
    bytes_accessed: float | None = None
    figures_from: str | None = None       # compiled.FROM_LIBTPU now, or FROM_STORE

    @property
    def total(self) -> int:
        return (self.parameters + self.optimizer + self.batch_bytes + self.temporaries
                + self.generated_code)

    @property
    def fits(self) -> bool:
        return self.compiler_message is None and self.total <= self.hbm_usable

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total": self.total, "fits": self.fits}


def analytic_temporaries(cfg, spec: PlanSpec, mesh_shape: dict[str, int], gradients: int,
                         block_params: int, micro_batches: int = 1) -> int:
    """A rough per-device estimate of the step's temporaries (what the compiler would report
    as ``temp_size``), bytes, for model ``cfg`` (a MythosConfig); it counts:

      * gradients, sharded like the parameters (``gradients`` bytes);
      * with fsdp > 1, the recurrent block's ``block_params`` gathered whole (fp32 + compute
        copy + its full gradient before the reduce-scatter), split only by tensor/expert;
      * for one micro-batch (the global batch over ``micro_batches``): logits and their
        gradient (fp32); the attention probabilities of each prelude/coda
        layer (kept for backward) plus one layer's scores, probabilities and gradient;
      * per layer ~12 residual-stream-sized activations, per differentiated loop 4 fp32
        carries (loops are rematerialised), and the routed MoE rows of one loop.
    It ignores fusion, buffer reuse and collective buffers: compile when you can.
    """
    b, t, d = _local_batch(spec, mesh_shape) // micro_batches, spec.seq_len, cfg.dim
    c = 2 if cfg.dtype == "bfloat16" else 4
    tensor = mesh_shape.get("tensor", 1)
    heads = cfg.n_heads // tensor if cfg.n_heads % tensor == 0 else cfg.n_heads
    gathered = 0
    if mesh_shape.get("fsdp", 1) > 1:
        gathered = block_params * (4 + c + 4) // (tensor * mesh_shape.get("expert", 1))
    layers = cfg.prelude_layers + cfg.coda_layers
    grad_loops = spec.loops if spec.backprop_depth is None else min(spec.loops,
                                                                    spec.backprop_depth)
    logits = 2 * b * t * cfg.vocab_size * 4
    attention = (layers + 3) * b * heads * t * t * 4
    activations = (layers + 1) * 12 * b * t * d * c + grad_loops * 4 * b * t * d * 4
    moe = b * t * cfg.n_experts_per_tok * (d + 3 * cfg.expert_dim) * c
    return gradients + gathered + logits + attention + activations + moe


def _local_batch(spec: PlanSpec, mesh_shape: dict[str, int]) -> int:
    from mythos_jax.train.step import batch_axes

    return spec.batch // math.prod(mesh_shape[a] for a in batch_axes(mesh_shape))


# libtpu's compile-time out-of-memory error: "... the total memory required for HLO
# temporaries (51.23G) exceeds available HBM (30.75G) ..." (sizes in GiB, binary units).
_OOM = re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\)")


def _human_bytes(number: str, unit: str) -> int:
    return int(float(number) * 1024 ** " KMGT".index(unit or " "))


def plan_memory(spec: PlanSpec, acc: Accelerator, mesh_spec: str, analytic: bool = False,
                compiled: CompilerFigures | None = None,
                may_compile: Callable[[], bool] = lambda: True) -> MemoryPlan:
    """Compile the trainer's step for ``spec`` on ``acc`` (or estimate it, see module
    docstring); a mesh or batch that does not match the slice raises ValueError.
    ``compiled``: the compiler's figures by program, shared by the calls of one session (steps
    that differ only in constants compile once) and, with a folder, across sessions.
    ``may_compile``: asked before a program not compiled yet goes to libtpu; when it says no,
    the report is the estimate. Safe to call from several threads: tracing takes turns, the
    compiler runs side by side."""
    from jax.sharding import AbstractMesh

    from mythos_jax.budget import per_device_bytes
    from mythos_jax.parallel.mesh import MESH_AXES, make_mesh, parse_mesh_spec
    from mythos_jax.train.step import batch_axes, build_plan

    try:
        sizes = parse_mesh_spec(mesh_spec, acc.chips)
    except ValueError as err:
        raise ValueError(f"mesh {mesh_spec!r} does not match {acc.name} ({acc.chips} chips, "
                         f"one device each): {err}") from None
    n_batch = math.prod(sizes[a] for a in batch_axes(sizes))
    if spec.batch % n_batch:
        raise ValueError(f"batch {spec.batch} does not split over the batch axes "
                         f"{batch_axes(sizes)} of mesh {mesh_spec!r} ({n_batch} ways)")

    with _TRACING:
        train_cfg = spec.train_config()
        plan = build_plan(train_cfg, AbstractMesh(tuple(sizes.values()), MESH_AXES))
    state, shardings, cfg = plan.abstract_state, plan.shardings, plan.model_cfg
    batch = abstract_batch(spec)
    report = MemoryPlan(
        variant=spec.variant, accelerator=acc.name, topology=acc.topology, chips=acc.chips,
        hosts=acc.hosts, mesh=sizes, rules=spec.rules, batch=spec.batch,
        seq_len=spec.seq_len, loops=spec.loops, backprop_depth=spec.backprop_depth,
        dtype=cfg.dtype, loop_remat=cfg.loop_remat, moe_impl=cfg.moe_impl,
        attention_impl=cfg.attention_impl, n_params=_count(state.params), method="analytic",
        reason=None,
        parameters=per_device_bytes((state.params, state.buffers),
                                    (shardings.params, shardings.buffers)),
        optimizer=per_device_bytes((state.opt_state, state.step, state.nonfinite),
                                   (shardings.opt_state, shardings.step, shardings.nonfinite)),
        batch_bytes=per_device_bytes(batch, {k: plan.batch_sharding for k in batch}),
        temporaries=analytic_temporaries(
            cfg, spec, sizes, per_device_bytes(state.params, shardings.params),
            _count(state.params["recurrent"]), train_cfg.optim.grad_accum),
        generated_code=0, hbm_usable=int(acc.generation.usable_hbm_gib * GIB),
        hbm_nominal=int(acc.generation.hbm_gib * GIB))

    if analytic:
        report.reason = "--analytic given"
        return report
    try:
        devices = topology_devices(acc)
    except Exception as err:   # no libtpu wheel, or libtpu refusing this host
        report.reason = f"no TPU compiler on this host ({type(err).__name__}: {_first(err)})"
        return report
    with _TRACING:
        plan = build_plan(train_cfg, make_mesh(mesh_spec, devices))
    _compile(report, plan, batch, CompilerFigures() if compiled is None else compiled,
             may_compile)
    return report


# JAX tracing, configuration and nnx graph state are not meant to be shared by threads
# mid-trace: one plan traces at a time, while libtpu compiles others
_TRACING = threading.Lock()
# StableHLO constants: their values do not change a program's buffers
_CONSTANT = re.compile(r"dense<[^>]*>")


def _compile(report: MemoryPlan, plan, batch: dict, compiled: CompilerFigures,
             may_compile: Callable[[], bool]) -> None:
    """Fill ``report``'s compiler fields from ``compiled`` (libtpu compiling the step when
    the program is new and ``may_compile()``; else the estimate stays, with its reason)."""
    import time

    with _TRACING:
        start = time.perf_counter()
        lowered = lower_train_step(plan, batch)
        program = _CONSTANT.sub("dense<_>", lowered.as_text())
    libtpu = _libtpu_version()
    key = program_key(program, report.accelerator, libtpu)
    report.program = key[:12]
    found = compiled.get(key, lambda: _run_compiler(lowered, report.accelerator, start),
                         may_compile)
    if found is None:
        report.reason = "not compiled: the compile budget was spent"
        return
    figures, report.figures_from = found
    report.method, report.libtpu = "compiled", libtpu
    for field, value in figures.items():
        setattr(report, field, value)


def _run_compiler(lowered, accelerator: str, start: float) -> dict:
    """libtpu's figures for ``lowered`` (``compiled.FIGURES``); its out-of-memory message
    becomes ``compiler_message``, any other failure a CommandError."""
    import time

    import jax

    from mythos_jax.errors import CommandError
    from mythos_jax.runtime import return_freed_memory

    figures = dict.fromkeys(FIGURES)
    figures["generated_code"] = 0
    cache = jax.config.jax_enable_compilation_cache
    if cache:                     # compile-only executables cannot be loaded back
        jax.config.update("jax_enable_compilation_cache", False)
    try:
        executable = lowered.compile()
    except Exception as err:
        match = _OOM.search(str(err))
        if match is None:
            raise CommandError(f"the training step does not compile for {accelerator}: "
                               f"{type(err).__name__}: {_first(err)}") from err
        figures["temporaries"] = _human_bytes(*match.group(1, 2))
        figures["compiler_message"] = _first(err)
    else:
        stats = executable.memory_analysis()
        figures["temporaries"] = stats.temp_size_in_bytes
        figures["generated_code"] = stats.generated_code_size_in_bytes
        cost = executable.cost_analysis() or {}
        for field, name in (("flops", "flops"), ("bytes_accessed", "bytes accessed")):
            figures[field] = None if cost.get(name) is None else float(cost[name])
        del executable
    finally:
        if cache:
            jax.config.update("jax_enable_compilation_cache", True)
    return_freed_memory()           # libtpu's freed gigabytes, kept by the allocator otherwise
    figures["compile_seconds"] = time.perf_counter() - start
    return figures


def _count(tree) -> int:
    """Elements of every leaf of ``tree`` (ShapeDtypeStructs)."""
    import jax

    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _first(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _libtpu_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return None
