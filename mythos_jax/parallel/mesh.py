"""A device mesh from a spec such as ``"data=2,fsdp=1,tensor=1,expert=4"``.

Axes are always ``MESH_AXES`` in that order (unnamed axes get size 1); one size may be -1,
meaning "the remaining devices". Meshes use ``AxisType.Auto`` (GSPMD propagation).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor", "expert")


def parse_mesh_spec(spec: str, n_devices: int) -> dict[str, int]:
    """``"data=2,expert=-1"`` -> {"data": 2, "fsdp": 1, "tensor": 1, "expert": n/2}."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise ValueError(f"mesh spec {spec!r}: expected AXIS=SIZE with AXIS in {MESH_AXES}, "
                             f"got {part!r}")
        if name in seen:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
        seen.add(name)
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"mesh spec {spec!r}: size of {name!r} must be an int, "
                             f"got {value!r}") from None
        if sizes[name] == 0 or sizes[name] < -1:
            raise ValueError(f"mesh spec {spec!r}: size of {name!r} must be >= 1 or -1")
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh spec {spec!r}: only one axis may be -1, got {rest}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if rest:
        if n_devices % known:
            raise ValueError(f"mesh spec {spec!r}: {n_devices} devices do not divide by {known}")
        sizes[rest[0]] = n_devices // known
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(f"mesh spec {spec!r} needs {math.prod(sizes.values())} devices, "
                         f"there are {n_devices}")
    return sizes


def make_mesh(spec: str = "data=-1", devices=None) -> Mesh:
    """A Mesh over ``devices`` (default: all) with axes ``MESH_AXES`` sized by ``spec``."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = parse_mesh_spec(spec, len(devices))
    grid = np.asarray(devices).reshape(tuple(sizes[a] for a in MESH_AXES))
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
