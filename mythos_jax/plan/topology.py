"""TPU slices by their gcloud accelerator type (``v4-8``, ``v5litepod-16``, ``v5p-64``,
``v6e-8``): chips, hosts, libtpu topology, HBM per chip, and compile-only devices for them.

    acc = accelerator("v5p-64")        # 32 chips on 8 hosts, topology "v5:2x4x4", 95 GiB HBM
    devices = topology_devices(acc)    # 32 compile-only TPU devices, on any host with libtpu

``tpu_setup/common.sh`` (``accelerator_chips``) knows the same types; a test keeps the two in
step. Only power-of-two slices are listed.
"""

from __future__ import annotations

import dataclasses
import os
import re

GIB = 1024 ** 3

# Chips per slice -> ICI topology. v4/v5p slices are 3-D tori whose accelerator-type number
# counts TensorCores (2 per chip, fused into one "megacore" device); v5e/v6e are 2-D and count
# chips. A v4/v5p host has 4 chips; a v5e/v6e host 8 (single-host slices) or 4 (pods).
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU generation: ``prefix`` of its gcloud accelerator types (``v5p`` -> v5p-64),
    libtpu topology prefix, cores counted per chip in the type's number, chip config, HBM per
    chip (nominal GiB, and what libtpu 0.0.50 says is usable: its CompileTimeHbmOom message),
    and the largest slice in chips."""
    prefix: str
    topology_prefix: str
    cores_per_chip: int
    chip_config: str
    hbm_gib: float
    usable_hbm_gib: float
    max_chips: int

    @property
    def shapes(self) -> dict[int, str]:
        table = _SHAPES_3D if self.cores_per_chip == 2 else _SHAPES_2D
        return {c: s for c, s in table.items() if c <= self.max_chips}


GENERATIONS = {g.prefix: g for g in (
    Generation("v4", "v4", 2, "megacore", 32, 30.75, 2048),
    Generation("v5litepod", "v5e", 1, "default", 16, 15.75, 256),
    Generation("v5p", "v5", 2, "megacore", 95, 95.73, 4096),
    Generation("v6e", "v6e", 1, "default", 32, 31.24, 256),
)}


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """A TPU slice by its gcloud accelerator type, e.g. ``v5p-64``: 32 chips on 8 hosts."""
    name: str
    generation: Generation
    chips: int

    @property
    def topology(self) -> str:
        """libtpu's topology name, e.g. ``v5:2x4x4``."""
        return f"{self.generation.topology_prefix}:{self.generation.shapes[self.chips]}"

    @property
    def single_host(self) -> bool:
        return self.chips <= (4 if self.generation.cores_per_chip == 2 else 8)

    @property
    def hosts(self) -> int:
        return 1 if self.single_host else self.chips // 4

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        dims = [int(d) for d in self.generation.shapes[self.chips].split("x")]
        if self.single_host:
            return tuple(dims + [1] * (3 - len(dims)))[:3]
        return (2, 2, 1)


def accelerator_types() -> list[str]:
    """Every accelerator type ``plan`` and ``tpu_setup/`` know, smallest first per generation."""
    return [f"{g.prefix}-{chips * g.cores_per_chip}"
            for g in GENERATIONS.values() for chips in g.shapes]


def accelerator(name: str) -> Accelerator:
    """``"v5p-64"`` -> Accelerator(32 chips, topology v5:2x4x4); unknown names raise
    ``ValueError`` listing the known ones."""
    prefix, _, number = name.rpartition("-")
    generation = GENERATIONS.get(prefix)
    count = int(number) if re.fullmatch(r"[1-9][0-9]*", number) else 0
    chips = count // generation.cores_per_chip if generation else 0
    if (generation is None or count % generation.cores_per_chip
            or chips not in generation.shapes):
        raise ValueError(f"unknown TPU accelerator type {name!r}; known: "
                         f"{', '.join(accelerator_types())}")
    return Accelerator(name, generation, chips)


def _quiet_libtpu(acc: Accelerator) -> None:
    """Environment for a compile-only libtpu in this process: no TPU metadata server, no
    warnings about the (absent) workers, and no exclusive lock (nothing runs on a TPU here;
    another JAX process holding ``/tmp/libtpu_lockfile`` must not stop the compile)."""
    for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", acc.name),
                       ("TPU_WORKER_HOSTNAMES", "localhost"),
                       ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
        os.environ.setdefault(key, value)


def topology_devices(acc: Accelerator) -> list:
    """Compile-only devices of ``acc``'s topology (needs the libtpu wheel, no TPU)."""
    from jax.experimental import topologies

    _quiet_libtpu(acc)
    topology = topologies.get_topology_desc(
        platform="tpu", topology_name=acc.topology, chip_config_name=acc.generation.chip_config,
        chips_per_host_bounds=acc.chips_per_host_bounds, num_slices=1)
    return list(topology.devices)
