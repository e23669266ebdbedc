"""``mythos-jax plan``: does a variant's training step fit in each chip of a TPU slice?

    mythos-jax plan --variant mythos_1b --topology v4-8 --mesh fsdp=4
    mythos-jax plan --variant mythos_10b --topology v5p-64 --mesh fsdp=32 --json -

The training step (forward, cross-entropy, backward, AdamW update) is compiled ahead of time
for the slice's TPU topology on this host, through ``jax.experimental.topologies`` and libtpu
(MaxText's ``train_compile`` does the same): no TPU is needed, only the ``libtpu`` wheel. The
compiler's own memory analysis gives the per-device figures; parameters and optimizer state
come from the shardings. Without libtpu (or with ``--analytic``) the command falls back to an
analytic estimate and says so on its first line. A step that does not fit is reported with the
compiler's out-of-memory message and exit code 1.

The step is a minimal one (model, cross-entropy, AdamW; :func:`build_train_step`), the one
place to switch to the trainer's own (``mythos_jax.train.step``: ``build_plan`` and
``make_train_step(plan).jitted``, lowered under ``jax.set_mesh``). Accelerator types and
compile-only TPU devices come from ``mythos_jax.tpu_topology``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from typing import Any

from mythos_jax.config import ATTENTION_IMPLS, MOE_IMPLS
from mythos_jax.tpu_topology import GIB, Accelerator, accelerator, topology_devices


# ---------------------------------------------------------------------------- what is planned
@dataclasses.dataclass(frozen=True)
class PlanSpec:
    """One training step to fit: the model, the global batch of ``seq_len`` tokens, the loop
    count (``loops`` recurrent iterations, gradient through the last ``backprop_depth`` of
    them, or all when None), and AdamW."""
    cfg: Any                      # MythosConfig
    batch: int
    seq_len: int
    loops: int
    backprop_depth: int | None = None
    rules: str = "default"        # mythos_jax.parallel.rules.RULE_PRESETS


def batch_axes(mesh_shape: dict[str, int]) -> tuple[str, ...]:
    """Mesh axes the batch is split over: those of ("data", "fsdp", "expert") with size > 1,
    as the rules' ``batch`` entry and the trainer split it."""
    return tuple(a for a in ("data", "fsdp", "expert") if mesh_shape.get(a, 1) > 1)


def _optimizer():
    import optax

    return optax.adamw(3e-4, b1=0.9, b2=0.95, weight_decay=0.1)


def abstract_train_state(cfg):
    """``(graphdef, state)`` of the model + AdamW, shapes only (nothing is allocated);
    ``state`` is the NNX state of ``(model, optimizer)``."""
    from flax import nnx

    from mythos_jax.model import OpenMythos

    def create():
        model = OpenMythos(cfg, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, _optimizer(), wrt=nnx.Param)

    return nnx.split(nnx.eval_shape(create))


def build_train_step(spec: PlanSpec, mesh):
    """The jitted training step for ``spec`` on ``mesh`` and its abstract arguments.

    Returns ``(step, args)``: ``step(state, inputs, targets, n_loops) -> (state, loss)``,
    cross-entropy then one AdamW update, with the state sharded by
    ``mythos_jax.parallel.rules.state_shardings`` under ``spec.rules`` and donated (as a
    trainer donates it), the batch split over :func:`batch_axes`; ``args`` are the abstract
    arguments for ``step.lower(*args)``, to be lowered under ``jax.set_mesh(mesh)`` and
    ``activation_rules`` (see :func:`lower_on`). The loop count is a run-time scalar (as the
    trainer draws it), bounded by ``spec.loops``.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from mythos_jax.parallel.rules import rules_preset, state_shardings

    graphdef, abstract_state = abstract_train_state(spec.cfg)
    state_sharding = state_shardings(abstract_state, mesh, rules_preset(spec.rules))
    batch_sharding = NamedSharding(mesh, PartitionSpec(batch_axes(dict(mesh.shape)) or None))
    scalar = NamedSharding(mesh, PartitionSpec())

    def step(state, inputs, targets, n_loops):
        model, optimizer = nnx.merge(graphdef, state)

        def loss_fn(model):
            logits = model(inputs, n_loops, backprop_depth=spec.backprop_depth,
                           max_loops=spec.loops)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    jitted = jax.jit(step, donate_argnums=0,
                     in_shardings=(state_sharding, batch_sharding, batch_sharding, scalar),
                     out_shardings=(state_sharding, scalar))
    tokens = jax.ShapeDtypeStruct((spec.batch, spec.seq_len), jnp.int32)
    return jitted, (abstract_state, tokens, tokens, jax.ShapeDtypeStruct((), jnp.int32))


def lower_on(spec: PlanSpec, mesh):
    """``build_train_step(spec, mesh)`` lowered with ``mesh`` and ``spec.rules`` active (the
    model's activation constraints follow them, as in training)."""
    import jax

    from mythos_jax.parallel.rules import activation_rules, rules_preset

    step, args = build_train_step(spec, mesh)
    with jax.set_mesh(mesh), activation_rules(rules_preset(spec.rules)):
        return step.lower(*args)


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
    libtpu: str | None = None

    @property
    def total(self) -> int:
        return (self.parameters + self.optimizer + self.batch_bytes + self.temporaries
                + self.generated_code)

    @property
    def fits(self) -> bool:
        return self.compiler_message is None and self.total <= self.hbm_usable

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total": self.total, "fits": self.fits}


def sharded_bytes(state, shardings) -> int:
    """Bytes one device holds of ``state`` (an NNX state) laid out by ``shardings``."""
    import jax
    from flax import nnx

    def size(variable, sharding) -> int:
        value = variable.get_value()
        return math.prod(sharding.shard_shape(value.shape)) * getattr(value.dtype, "itemsize", 8)

    return sum(jax.tree.leaves(jax.tree.map(size, state, shardings,
                                            is_leaf=lambda x: isinstance(x, nnx.Variable))))


def _local_batch(spec: PlanSpec, mesh_shape: dict[str, int]) -> int:
    return spec.batch // math.prod(mesh_shape[a] for a in batch_axes(mesh_shape))


def analytic_temporaries(spec: PlanSpec, mesh_shape: dict[str, int], gradients: int,
                         block_params: int) -> int:
    """A rough per-device estimate of the step's temporaries (what the compiler would report
    as ``temp_size``), bytes; it counts:

      * gradients, sharded like the parameters (``gradients`` bytes);
      * with fsdp > 1, the recurrent block's ``block_params`` gathered whole (fp32 + compute
        copy + its full gradient before the reduce-scatter), split only by tensor/expert;
      * logits and their gradient (fp32); the attention probabilities of each prelude/coda
        layer (kept for backward) plus one layer's scores, probabilities and gradient;
      * per layer ~12 residual-stream-sized activations, per differentiated loop 4 fp32
        carries (loops are rematerialised), and the routed MoE rows of one loop.
    It ignores fusion, buffer reuse and collective buffers: compile when you can.
    """
    cfg = spec.cfg
    b, t, d = _local_batch(spec, mesh_shape), spec.seq_len, cfg.dim
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


# libtpu's compile-time out-of-memory error: "... the total memory required for HLO
# temporaries (51.23G) exceeds available HBM (30.75G) ..." (sizes in GiB, binary units).
_OOM = re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\)")


def _human_bytes(number: str, unit: str) -> int:
    return int(float(number) * 1024 ** " KMGT".index(unit or " "))


def plan_memory(variant: str, spec: PlanSpec, acc: Accelerator, mesh_spec: str,
                analytic: bool = False) -> MemoryPlan:
    """Compile ``spec``'s training step for ``acc`` (or estimate it, see module docstring)."""
    import time

    import jax
    from jax.sharding import AbstractMesh

    from mythos_jax.parallel.mesh import MESH_AXES, make_mesh, parse_mesh_spec
    from mythos_jax.parallel.rules import rules_preset, state_shardings

    try:
        sizes = parse_mesh_spec(mesh_spec, acc.chips)
    except ValueError as err:
        raise ValueError(f"mesh {mesh_spec!r} does not match {acc.name} ({acc.chips} chips, "
                         f"one device each): {err}") from None
    n_batch = math.prod(sizes[a] for a in batch_axes(sizes))
    if spec.batch % n_batch:
        raise ValueError(f"batch {spec.batch} does not split over the batch axes "
                         f"{batch_axes(sizes)} of mesh {mesh_spec!r} ({n_batch} ways)")

    _, state = abstract_train_state(spec.cfg)
    shardings = state_shardings(state, AbstractMesh(tuple(sizes.values()), MESH_AXES),
                                rules_preset(spec.rules))
    parameters, optimizer = (sharded_bytes(state[i], shardings[i]) for i in (0, 1))
    report = MemoryPlan(
        variant=variant, accelerator=acc.name, topology=acc.topology, chips=acc.chips,
        hosts=acc.hosts, mesh=sizes, rules=spec.rules, batch=spec.batch,
        seq_len=spec.seq_len, loops=spec.loops, backprop_depth=spec.backprop_depth,
        dtype=spec.cfg.dtype, loop_remat=spec.cfg.loop_remat, moe_impl=spec.cfg.moe_impl,
        attention_impl=spec.cfg.attention_impl,
        n_params=_count_params(state[0]), method="analytic", reason=None,
        parameters=parameters, optimizer=optimizer,
        batch_bytes=2 * _local_batch(spec, sizes) * spec.seq_len * 4, temporaries=0,
        generated_code=0, hbm_usable=int(acc.generation.usable_hbm_gib * GIB),
        hbm_nominal=int(acc.generation.hbm_gib * GIB))

    if analytic:
        report.reason = "--analytic given"
    else:
        try:
            devices = topology_devices(acc)
        except Exception as err:   # no libtpu wheel, or libtpu refusing this host
            report.reason = f"no TPU compiler on this host ({type(err).__name__}: {_first(err)})"
    if report.reason is not None:
        report.temporaries = analytic_temporaries(spec, sizes, parameters,
                                                _count_params(state[0]["recurrent"]))
        return report

    start = time.perf_counter()
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)   # compile-only: not loadable
    try:
        compiled = lower_on(spec, make_mesh(mesh_spec, devices)).compile()
    except Exception as err:
        match = _OOM.search(str(err))
        if match is None:
            from mythos_jax.errors import CommandError

            raise CommandError(f"the training step does not compile for {acc.name}: "
                               f"{type(err).__name__}: {_first(err)}") from err
        report.temporaries = _human_bytes(*match.group(1, 2))
        report.compiler_message = _first(err)
    else:
        stats = compiled.memory_analysis()
        report.temporaries = stats.temp_size_in_bytes
        report.generated_code = stats.generated_code_size_in_bytes
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)
    report.method, report.compile_seconds = "compiled", time.perf_counter() - start
    report.libtpu = _libtpu_version()
    return report


def _count_params(state) -> int:
    import jax
    from flax import nnx

    return sum(math.prod(v.get_value().shape) for v in jax.tree.leaves(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)) if isinstance(v, nnx.Param))


def _first(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _libtpu_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------- command line
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare ``mythos-jax plan``'s arguments on ``parser``."""
    parser.add_argument("--variant", required=True, metavar="NAME",
                        help="a named config (mythos_jax.variants), e.g. mythos_1b")
    parser.add_argument("--topology", required=True, metavar="TYPE",
                        help="TPU accelerator type as gcloud names it: v4-8, v5litepod-16, "
                             "v5p-64, v6e-8, ...")
    parser.add_argument("--mesh", default="fsdp=-1", metavar="SPEC",
                        help="mesh spec over the slice's chips, e.g. data=2,fsdp=16 "
                             "(default fsdp=-1)")
    parser.add_argument("--batch", type=int, metavar="N",
                        help="global batch in sequences (default: one per device of the "
                             "batch axes data/fsdp/expert)")
    parser.add_argument("--seq-len", type=int, metavar="T",
                        help="tokens per sequence (default: min(max_seq_len, 2048))")
    parser.add_argument("--loops", type=int, metavar="N",
                        help="recurrent loops per step (default: the variant's max_loop_iters)")
    parser.add_argument("--backprop-depth", type=int, metavar="K",
                        help="gradient through the last K loops only (default: all)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="compute dtype (parameters stay fp32; default bfloat16)")
    parser.add_argument("--remat", default="full", choices=("full", "dots", "none"),
                        help="loop_remat: what backprop keeps per loop (default full)")
    parser.add_argument("--moe-impl", choices=MOE_IMPLS,
                        help="MoE dispatch (default: the variant's)")
    parser.add_argument("--attention-impl", choices=ATTENTION_IMPLS,
                        help="MLA attention: auto (Pallas kernels on TPU), xla or pallas "
                             "(default: the variant's)")
    parser.add_argument("--rules", default="default", metavar="PRESET",
                        help="logical-axis rules preset (mythos_jax.parallel.rules: default, "
                             "fsdp, expert, tensor)")
    parser.add_argument("--analytic", action="store_true",
                        help="skip compilation: analytic estimate only")
    parser.add_argument("--json", metavar="PATH",
                        help="also write the figures (bytes) as JSON to PATH ('-': stdout)")


def plan_spec(args: argparse.Namespace) -> PlanSpec:
    """The PlanSpec the command line describes (defaults filled in, bounds checked)."""
    from mythos_jax.variants import get_variant

    overrides = {"dtype": args.dtype, "loop_remat": args.remat}
    for field in ("moe_impl", "attention_impl"):
        if getattr(args, field):
            overrides[field] = getattr(args, field)
    cfg = get_variant(args.variant).replace(**overrides)
    seq_len = args.seq_len or min(cfg.max_seq_len, 2048)
    loops = args.loops or cfg.max_loop_iters
    for name, value, low, high in (("--seq-len", seq_len, 1, cfg.max_seq_len),
                                   ("--loops", loops, 1, None),
                                   ("--batch", args.batch, 1, None),
                                   ("--backprop-depth", args.backprop_depth, 1, None)):
        if value is not None and (value < low or (high is not None and value > high)):
            raise ValueError(f"{name} must be in [{low}, {high or 'inf'}], got {value}")
    return PlanSpec(cfg, batch=args.batch or 0, seq_len=seq_len, loops=loops,
                    backprop_depth=args.backprop_depth, rules=args.rules)


def run(args: argparse.Namespace) -> int:
    """``mythos-jax plan``: 0 if the step fits, 1 if not; bad arguments raise ValueError."""
    from mythos_jax.parallel.mesh import parse_mesh_spec

    acc = accelerator(args.topology)
    _cpu_only()
    spec = plan_spec(args)
    if not spec.batch:
        try:
            sizes = parse_mesh_spec(args.mesh, acc.chips)
        except ValueError:
            sizes = {}      # plan_memory reports the mismatch
        spec = dataclasses.replace(spec, batch=math.prod(sizes.get(a, 1)
                                                         for a in batch_axes(sizes)))
    report = plan_memory(args.variant, spec, acc, args.mesh, analytic=args.analytic)
    print(format_plan(report), flush=True)
    if args.json:
        text = json.dumps(report.to_dict(), indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 0 if report.fits else 1


def _cpu_only() -> None:
    """Plan never runs anything: keep JAX's own backend on the CPU (on a TPU VM this leaves
    the chips to a training job), unless backends already exist."""
    import jax
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")


if __name__ == "__main__":       # python -m mythos_jax.plan ... == mythos-jax plan ...
    from mythos_jax.cli import main

    sys.exit(main(["plan", *sys.argv[1:]]))
