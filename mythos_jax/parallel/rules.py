"""Logical axes -> mesh axes: rule presets, their validation, parameter shardings, activation
constraints and specs, and a module initialised directly sharded. Imports nothing of the
model: callers pass the module or state they shard.

Parameters carry ``logical_axes`` metadata (``PARAM_AXES``); the residual stream and the
logits are constrained with ``ACTIVATION_AXES`` through :func:`constrain`. A rules table maps
each logical axis to None (replicated), a mesh axis, or a tuple of mesh axes. Mesh axes of
size 1 are left out, so one table serves every mesh; a dimension that its mesh axes do not
divide keeps only the leading ones that do (none: replicated), except the expert dimension of
the MoE weights, where a mismatch is an error (experts cannot be split unevenly).

Presets (``RULE_PRESETS``, :func:`rules_preset`); all split the batch over
("data", "fsdp", "expert") and never shard the sequence or the hidden width of activations:
  "default"  FSDP (embed over fsdp) + tensor parallel (heads, mlp, vocab over tensor) +
             expert parallel (experts over expert).
  "fsdp"     pure FSDP: the embed dimension of every weight over fsdp, nothing else.
  "expert"   expert parallel + FSDP: experts over expert, embed over fsdp.
  "tensor"   tensor parallel (Megatron): heads, mlp, vocab over tensor; weights whole otherwise.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mythos_jax.parallel.mesh import MESH_AXES

PARAM_AXES = ("embed", "embed_out", "vocab", "heads", "kv_heads", "q_lora", "kv_lora", "mlp",
              "expert", "lora", "loop")
ACTIVATION_AXES = ("batch", "seq", "act_embed", "act_vocab")
LOGICAL_AXES = PARAM_AXES + ACTIVATION_AXES
BATCH_MESH_AXES = ("data", "fsdp", "expert")   # data-like mesh axes: every preset splits batch

Rules = Mapping[str, "str | tuple[str, ...] | None"]


def _preset(**mapping) -> Rules:
    return MappingProxyType({**dict.fromkeys(LOGICAL_AXES), "batch": BATCH_MESH_AXES,
                             **mapping})


_TENSOR = dict(vocab="tensor", heads="tensor", kv_heads="tensor", mlp="tensor",
               act_vocab="tensor")
RULE_PRESETS: Mapping[str, Rules] = MappingProxyType({
    "default": _preset(embed="fsdp", expert="expert", **_TENSOR),
    "fsdp": _preset(embed="fsdp"),
    "expert": _preset(embed="fsdp", expert="expert"),
    "tensor": _preset(**_TENSOR),
})
DEFAULT_RULES = RULE_PRESETS["default"]


def rules_preset(name: str) -> Rules:
    """The rules table called ``name`` (one of ``RULE_PRESETS``)."""
    if name not in RULE_PRESETS:
        raise ValueError(f"unknown sharding rules preset {name!r}; choose one of "
                         f"{sorted(RULE_PRESETS)}")
    return RULE_PRESETS[name]


def validate_rules(rules: Rules, mesh_axes: Sequence[str] = MESH_AXES) -> None:
    """ValueError naming the entry when ``rules`` maps an unknown logical axis, names a mesh
    axis not in ``mesh_axes``, or repeats a mesh axis within one entry."""
    if not isinstance(rules, Mapping):
        raise TypeError(f"sharding rules must be a mapping logical axis -> mesh axes, got "
                        f"{type(rules).__name__}")
    for logical, target in rules.items():
        if logical not in LOGICAL_AXES:
            raise ValueError(f"sharding rules: unknown logical axis {logical!r}; known logical "
                             f"axes are {LOGICAL_AXES}")
        targets = _targets(target)
        for mesh_axis in targets:
            if mesh_axis not in mesh_axes:
                raise ValueError(f"sharding rules: {logical!r} -> {target!r} names unknown mesh "
                                 f"axis {mesh_axis!r}; mesh axes are {tuple(mesh_axes)}")
        if len(set(targets)) != len(targets):
            raise ValueError(f"sharding rules: {logical!r} -> {target!r} repeats a mesh axis")


def _targets(target) -> tuple:
    """A rules entry as a tuple of mesh axes."""
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def partition_spec(axes: Sequence[str | None], shape: Sequence[int], mesh,
                   rules: Rules) -> PartitionSpec:
    """The spec of one array with logical ``axes`` (None entries replicate) on ``mesh`` (a Mesh
    or AbstractMesh): each dimension takes the mesh axes its rule names that have size > 1,
    are not used by an earlier dimension, and keep dividing it."""
    used, spec = set(), []
    for axis, size in zip(axes, shape):
        if axis is not None and axis not in LOGICAL_AXES:
            raise ValueError(f"unknown logical axis {axis!r} (shape {tuple(shape)}); known "
                             f"logical axes are {LOGICAL_AXES}")
        wanted = [a for a in _targets(rules.get(axis)) if mesh.shape.get(a, 1) > 1]
        if axis == "expert" and size % math.prod(mesh.shape[a] for a in wanted):
            sizes = ", ".join(f"{a!r} of size {mesh.shape[a]}" for a in wanted)
            raise ValueError(f"n_experts={size} is not divisible by the mesh axis {sizes} that "
                             f"the rules shard experts over; use a multiple of it or a smaller "
                             f"expert axis")
        chosen = []
        for mesh_axis in wanted:
            ways = math.prod(mesh.shape[a] for a in chosen) * mesh.shape[mesh_axis]
            if mesh_axis not in used and size % ways == 0:
                chosen.append(mesh_axis)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


# ---------------------------------------------------------------------------- activations
# Rules for activation constraints; a jit-cache key, so changing it retraces.
_ACTIVATION_RULES = jax.make_user_context(default_value=None)


def activation_rules(rules: Rules):
    """Context manager: :func:`constrain` uses ``rules`` instead of ``DEFAULT_RULES``
    (use the same table as for the parameters)."""
    validate_rules(rules)
    return _ACTIVATION_RULES(tuple(sorted(rules.items())))


def activation_spec(axes: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec | None:
    """The spec of an array of ``shape`` with logical ``axes`` on the current mesh
    (``jax.set_mesh``) under the active rules; None when no mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else partition_spec(axes, shape, mesh, active_rules())


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``x`` constrained to its :func:`activation_spec`; ``x`` itself when no mesh is set."""
    spec = activation_spec(axes, x.shape)
    return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


def active_rules() -> Rules:
    """The activation rules in force: :func:`activation_rules`'s table, else the default."""
    frozen = _ACTIVATION_RULES.value
    return DEFAULT_RULES if frozen is None else dict(frozen)


# ---------------------------------------------------------------------------- parameters
def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """A NamedSharding per variable of ``state`` (a prefix tree of it, for jit shardings);
    variables without ``logical_axes`` (rng state) are replicated. ValueError for rules naming
    unknown axes and for an expert count the expert mesh axis does not divide."""
    validate_rules(rules, mesh.axis_names)

    def sharding(variable):
        axes = variable.get_metadata().get("logical_axes")
        shape = variable.get_value().shape
        spec = PartitionSpec() if axes is None else partition_spec(axes, shape, mesh, rules)
        return NamedSharding(mesh, spec)

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def init_sharded(create: Callable[[], nnx.Module], mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """The module ``create()`` builds (e.g. ``lambda: OpenMythos(cfg, rngs=nnx.Rngs(0))``)
    with every variable created directly in its shards (the whole never exists on one
    device): traced once abstractly for the shardings, then run under jit."""
    graphdef, abstract_state = nnx.split(nnx.eval_shape(create))
    shardings = state_shardings(abstract_state, mesh, rules)
    return nnx.merge(graphdef, jax.jit(lambda: nnx.split(create())[1],
                                       out_shardings=shardings)())
