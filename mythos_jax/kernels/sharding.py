"""Run a kernel per shard of the mesh in force, split as its caller says.

A ``pallas_call`` is opaque to XLA's SPMD partitioner: under a sharded jit (``jax.set_mesh``)
XLA would gather its inputs onto every device and run the whole batch there. ``per_shard``
runs the kernel inside ``jax.shard_map`` instead. The caller passes ``spec``, the
PartitionSpec of the leading (batch, heads) dimensions (e.g. ``P(("data", "fsdp"),
"tensor")``, from its sharding rules: ``parallel.rules.activation_spec``); each array is split
by the roles of its dimensions. An array without a "heads" dimension (the shared k_rope, the
latent cache) is replicated over the head axes; shard_map's transpose sums its gradient over
them. A differentiable kernel is wrapped whole (its ``custom_vjp`` inside), so forward and
backward kernels both run per shard. ``check_vma=False``: a ``pallas_call`` has no
varying-manual-axes types.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
from jax.sharding import PartitionSpec

Axes = Sequence[str | None]


def per_shard(fn: Callable[..., jax.Array], in_axes: Sequence[Axes],
              spec: PartitionSpec | None) -> Callable[..., jax.Array]:
    """``fn(*arrays) -> array`` run per shard of the current mesh. ``in_axes[i]`` names the
    role ("batch", "heads" or None) of each dimension of ``arrays[i]``; ``spec`` splits the
    batch over ``spec[0]`` and the heads over ``spec[1]``; the output is split like
    ``arrays[0]`` (it must share its leading batch and head dimensions). ``fn`` itself runs
    when ``spec`` is None or splits nothing, when no mesh is set, or inside a shard_map
    (manual axes)."""
    def run(*arrays):
        mesh = jax.sharding.get_abstract_mesh()
        if spec is None or mesh.empty or mesh.manual_axes:
            return fn(*arrays)
        split = dict(zip(("batch", "heads"), spec))
        in_specs = tuple(PartitionSpec(*(split.get(axis) for axis in axes))
                         for axes, _ in zip(in_axes, arrays, strict=True))
        if not any(map(any, in_specs)):
            return fn(*arrays)
        if mesh.explicit_axes:   # Explicit meshes: shard_map takes inputs as in_specs say
            arrays = [jax.reshard(x, x_spec) for x, x_spec in zip(arrays, in_specs)]
        return jax.shard_map(fn, in_specs=in_specs, out_specs=in_specs[0],
                             check_vma=False)(*arrays)
    return run
