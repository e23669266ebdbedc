"""The grouped matmul of ``moe_impl="dropless"``: which one runs where, and the kernels.

    matmul = grouped_matmul(choice, dtype)      # (lhs (M, K), rhs (G, K, N), group_sizes (G,))
    out = matmul(rows, gate, group_sizes)       # -> (M, N) in lhs's dtype; rows past the groups 0

``choice`` (a ``GroupedMatmul``): "ragged_dot" (``jax.lax.ragged_dot``), "megablox" (the
Pallas megablox ``gmm``; interpreted off TPU), "tokamax" (``tokamax.ragged_dot``: Mosaic GPU,
Mosaic TPU v5+, its XLA implementation elsewhere) or "auto", resolved by ``TABLE``:

  platform  device                  dtype       grouped matmul
  gpu       any                     bf16/fp16   tokamax (Mosaic GPU), when installed
  gpu       any                     fp32        ragged_dot (Mosaic GPU takes no fp32)
  tpu       v5 and later            any         tokamax (Mosaic TPU), when installed
  tpu       v4 (or tokamax absent)  any         megablox
  other                                         ragged_dot
Under a multi-device mesh outside ``shard_map`` "auto" is "ragged_dot": GSPMD cannot partition
a Pallas call (the expert-parallel path runs the kernels per shard instead). A choice that
cannot run (tokamax not installed) falls back as the table says, logged once.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mythos_jax.kernels.dispatch import log_once, mesh_device_kind, mesh_platform
from mythos_jax.kernels.tokamax_attention import (MOSAIC_GPU_DTYPES, import_tokamax,
                                                  tpu_generation)
from mythos_jax.modes import GroupedMatmul

# (platform, case) -> choice; ``auto_choice`` finds the case. Printed by the benchmarks.
TABLE = {
    ("gpu", "bf16/fp16"): GroupedMatmul.TOKAMAX,
    ("gpu", "fp32"): GroupedMatmul.RAGGED_DOT,
    ("tpu", "v5+"): GroupedMatmul.TOKAMAX,
    ("tpu", "v4"): GroupedMatmul.MEGABLOX,
    ("cpu", "any"): GroupedMatmul.RAGGED_DOT,
}
_TOKAMAX_IMPLEMENTATIONS = {"gpu": "mosaic_gpu", "tpu": "mosaic_tpu"}
# What runs when a choice needs tokamax and it is not installed.
WITHOUT_TOKAMAX = {"gpu": GroupedMatmul.RAGGED_DOT, "tpu": GroupedMatmul.MEGABLOX}


def table_case(platform: str, device_kind: str, dtype) -> tuple[str, str]:
    """The ``TABLE`` key of this platform, device and dtype."""
    if platform == "gpu":
        return platform, "bf16/fp16" if jnp.dtype(dtype) in MOSAIC_GPU_DTYPES else "fp32"
    if platform == "tpu":
        generation = tpu_generation(device_kind)
        return platform, "v5+" if generation is not None and generation >= 5 else "v4"
    return "cpu", "any"


def auto_choice(platform: str, device_kind: str, dtype, partitioned: bool = False) -> str:
    """The choice "auto" resolves to (module docstring), tokamax's absence included."""
    if partitioned:
        return GroupedMatmul.RAGGED_DOT
    return _runnable(TABLE[table_case(platform, device_kind, dtype)], platform)


def resolve(choice: str, dtype) -> str:
    """``choice`` -> the grouped matmul that runs under the mesh in force (never "auto")."""
    choice = GroupedMatmul.parse(choice, "grouped_matmul")
    platform = mesh_platform()
    if choice != GroupedMatmul.AUTO:
        return _runnable(choice, platform)
    mesh = jax.sharding.get_abstract_mesh()
    partitioned = not mesh.empty and not mesh.manual_axes and math.prod(mesh.axis_sizes) > 1
    return auto_choice(platform, mesh_device_kind(), dtype, partitioned)


def is_pallas(choice: str, dtype) -> bool:
    """Whether ``choice`` runs a Pallas kernel here (shard_map then needs ``check_vma=False``)."""
    resolved = resolve(choice, dtype)
    return resolved == GroupedMatmul.MEGABLOX or (resolved == GroupedMatmul.TOKAMAX
                                                  and mesh_platform() in _TOKAMAX_IMPLEMENTATIONS)


def grouped_matmul(choice: str, dtype):
    """The matmul ``choice`` resolves to for ``dtype`` (module docstring)."""
    return _MATMULS[resolve(choice, dtype)]


def table_line() -> str:
    """``TABLE`` and what "auto" runs here in bf16, in one line (printed by the benchmarks)."""
    cases = ", ".join(f"{platform} {case}: {choice}" for (platform, case), choice in TABLE.items())
    return f"dropless grouped matmul 'auto': {cases}; here: {resolve('auto', jnp.bfloat16)}"


def _runnable(choice: str, platform: str) -> str:
    if choice == GroupedMatmul.TOKAMAX and import_tokamax()[0] is None:
        fallback = WITHOUT_TOKAMAX.get(platform, GroupedMatmul.RAGGED_DOT)
        log_once(f"grouped matmul {fallback}, not tokamax: {import_tokamax()[1]}")
        return fallback
    return choice


def _tokamax_matmul(lhs, rhs, group_sizes) -> jax.Array:
    """``tokamax.ragged_dot``: Mosaic kernels on GPU/TPU, its XLA implementation elsewhere."""
    tokamax = import_tokamax()[0]
    implementation = _TOKAMAX_IMPLEMENTATIONS.get(mesh_platform(), "xla")
    out = tokamax.ragged_dot(lhs, rhs, group_sizes, implementation=implementation)
    return _zero_past_groups(out, group_sizes).astype(lhs.dtype)


def _megablox_matmul(lhs, rhs, group_sizes) -> jax.Array:
    """The Pallas megablox ``gmm`` (interpret mode off TPU). Rows are padded to a whole row
    tile."""
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    n_rows = lhs.shape[0]
    tile_rows = min(128, 8 * math.ceil(n_rows / 8))
    padded_rows = tile_rows * math.ceil(n_rows / tile_rows)
    tiling = (tile_rows, min(128, rhs.shape[1]), min(128, rhs.shape[2]))
    out = gmm(jnp.pad(lhs, ((0, padded_rows - n_rows), (0, 0))), rhs, group_sizes, jnp.float32,
              tiling, None, None, False, mesh_platform() != "tpu")[:n_rows]
    return _zero_past_groups(out, group_sizes).astype(lhs.dtype)


def _zero_past_groups(out, group_sizes) -> jax.Array:
    """Rows past ``sum(group_sizes)`` set to 0 (kernels leave them undefined)."""
    in_groups = jnp.arange(out.shape[0]) < jnp.sum(group_sizes)
    return jnp.where(in_groups[:, None], out, 0)


_MATMULS = {GroupedMatmul.RAGGED_DOT: jax.lax.ragged_dot, GroupedMatmul.MEGABLOX: _megablox_matmul,
            GroupedMatmul.TOKAMAX: _tokamax_matmul}
