"""Device meshes, logical-axis sharding rules and directly-sharded model initialisation."""

from mythos_jax.parallel.mesh import MESH_AXES, make_mesh, parse_mesh_spec
from mythos_jax.parallel.rules import DEFAULT_RULES, init_sharded, state_shardings

__all__ = ["DEFAULT_RULES", "MESH_AXES", "init_sharded", "make_mesh", "parse_mesh_spec",
           "state_shardings"]
