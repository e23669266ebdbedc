"""Accelerator figures by ``device_kind`` prefix (vendor datasheets): dense bf16 peak FLOP/s and
HBM bandwidth. The one table MFU (``train/metrics.py``) and the kernel benchmarks
(``experiments/bench_attention.py``) read; TPU pod shapes and HBM capacity are in
``plan/topology.py``.
"""

from __future__ import annotations

from typing import NamedTuple


class Chip(NamedTuple):
    peak_bf16_flops: float      # FLOP/s, dense
    hbm_bytes_per_s: float      # bytes/s


CHIPS = {
    "TPU v2": Chip(45e12, 700e9), "TPU v3": Chip(123e12, 900e9), "TPU v4": Chip(275e12, 1228e9),
    "TPU v5 lite": Chip(197e12, 819e9), "TPU v5e": Chip(197e12, 819e9),
    "TPU v5p": Chip(459e12, 2765e9), "TPU v5": Chip(459e12, 2765e9),
    "TPU v6 lite": Chip(918e12, 1640e9), "TPU v6e": Chip(918e12, 1640e9),
    "TPU7x": Chip(2307e12, 7380e9),
    "NVIDIA H200": Chip(989e12, 4.8e12), "NVIDIA H100": Chip(989e12, 3.35e12),
    "NVIDIA A100": Chip(312e12, 2.0e12), "NVIDIA L4": Chip(121e12, 300e9),
    "NVIDIA B200": Chip(2250e12, 8.0e12),
}


def chip(device_kind: str) -> Chip | None:
    """The figures of the longest prefix of ``device_kind`` in the table, or None."""
    for prefix in sorted(CHIPS, key=len, reverse=True):
        if device_kind.startswith(prefix):
            return CHIPS[prefix]
    return None
