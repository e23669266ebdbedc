"""Device meshes, logical-axis sharding rules and directly-sharded model initialisation."""

from mythos_jax.parallel.mesh import MESH_AXES, make_mesh, parse_mesh_spec
from mythos_jax.parallel.rules import (DEFAULT_RULES, LOGICAL_AXES, RULE_PRESETS,
                                       activation_rules, activation_spec, constrain,
                                       init_sharded, partition_spec, rules_preset,
                                       state_shardings, validate_rules)

__all__ = ["DEFAULT_RULES", "LOGICAL_AXES", "MESH_AXES", "RULE_PRESETS", "activation_rules",
           "activation_spec", "constrain", "init_sharded", "make_mesh", "parse_mesh_spec",
           "partition_spec", "rules_preset", "state_shardings", "validate_rules"]
