"""Logical parameter axes -> mesh axes, and a model initialised directly sharded.

Every parameter carries ``logical_axes`` metadata (``embed``, ``heads``, ``kv_heads``,
``q_lora``, ``kv_lora``, ``mlp``, ``expert``, ``vocab``, ``lora``, ``loop``, ``embed_out``).
One rules table maps them to mesh axes; mesh axes of size 1 are left out of the specs, so the
same table serves data parallel, FSDP, tensor and expert parallel meshes. A dimension that its
mesh axis does not divide stays replicated.
"""

from __future__ import annotations

from typing import Mapping

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mythos_jax.config import MythosConfig
from mythos_jax.model import OpenMythos

DEFAULT_RULES: Mapping[str, str | None] = {
    "embed": "fsdp", "vocab": "tensor", "heads": "tensor", "kv_heads": "tensor",
    "mlp": "tensor", "expert": "expert", "q_lora": None, "kv_lora": None, "lora": None,
    "loop": None, "embed_out": None,
}


def partition_spec(axes, shape, mesh: Mesh, rules: Mapping[str, str | None]) -> PartitionSpec:
    """The spec of one array with logical ``axes`` (None entries replicate)."""
    used, spec = set(), []
    for axis, size in zip(axes, shape):
        mesh_axis = rules.get(axis) if axis is not None else None
        if (mesh_axis is None or mesh_axis in used or mesh.shape[mesh_axis] == 1
                or size % mesh.shape[mesh_axis]):
            spec.append(None)
        else:
            used.add(mesh_axis)
            spec.append(mesh_axis)
    return PartitionSpec(*spec)


def state_shardings(state: nnx.State, mesh: Mesh,
                    rules: Mapping[str, str | None] = DEFAULT_RULES):
    """A NamedSharding per variable of ``state`` (a prefix tree of it, for jit shardings);
    variables without ``logical_axes`` (rng state) are replicated."""
    def sharding(variable):
        axes = variable.get_metadata().get("logical_axes")
        shape = variable.get_value().shape
        spec = PartitionSpec() if axes is None else partition_spec(axes, shape, mesh, rules)
        return NamedSharding(mesh, spec)

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def init_sharded(cfg: MythosConfig, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES,
                 seed: int = 0) -> OpenMythos:
    """OpenMythos(cfg, rngs=nnx.Rngs(seed)) with every parameter created directly in its
    shards (the full model never exists on one device)."""
    abstract = nnx.eval_shape(lambda: OpenMythos(cfg, rngs=nnx.Rngs(seed)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    def create():
        return nnx.split(OpenMythos(cfg, rngs=nnx.Rngs(seed)))[1]

    return nnx.merge(graphdef, jax.jit(create, out_shardings=shardings)())
