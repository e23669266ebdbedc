"""Run a kernel per shard of the mesh in force, not on arrays gathered onto every device.

A ``pallas_call`` is opaque to XLA's SPMD partitioner: under a sharded jit (``jax.set_mesh``)
XLA would gather its inputs onto every device and run the whole batch there. ``per_shard``
runs the kernel inside ``jax.shard_map`` instead, each array split by the logical axes of its
dimensions under the active activation rules (``parallel.rules``: "batch" over the data-like
axes that divide it, "heads" over "tensor" when the rules shard heads and it divides). An
array without a "heads" dimension (the shared k_rope, the latent cache) is replicated over
the head axes; shard_map's transpose sums its gradient over them. A differentiable kernel is
wrapped whole (its ``custom_vjp`` inside), so forward and backward kernels both run per shard.
``check_vma=False``: a ``pallas_call`` has no varying-manual-axes types.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax

from mythos_jax.parallel import rules as rules_lib

Axes = Sequence[str | None]


def per_shard(fn: Callable[..., jax.Array],
              in_axes: Sequence[Axes]) -> Callable[..., jax.Array]:
    """``fn(*arrays) -> array`` run per shard of the current mesh. ``in_axes[i]`` names the
    logical axis ("batch", "heads" or None) of each dimension of ``arrays[i]``; the output is
    split like ``arrays[0]`` (it must share its leading batch and head dimensions). ``fn``
    itself runs when no mesh is set, inside a shard_map (manual axes), or when the rules
    split none of the arrays on this mesh."""
    def run(*arrays):
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or mesh.manual_axes:
            return fn(*arrays)
        rules = rules_lib.active_rules()
        in_specs = tuple(rules_lib.partition_spec(axes, x.shape, mesh, rules)
                         for axes, x in zip(in_axes, arrays, strict=True))
        if not any(map(any, in_specs)):
            return fn(*arrays)
        if mesh.explicit_axes:   # Explicit meshes: shard_map takes inputs as in_specs say
            arrays = [jax.reshard(x, spec) for x, spec in zip(arrays, in_specs)]
        return jax.shard_map(fn, in_specs=in_specs, out_specs=in_specs[0],
                             check_vma=False)(*arrays)
    return run

