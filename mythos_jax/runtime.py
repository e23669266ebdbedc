"""Process-wide housekeeping for long-running processes (the test suite, an experiment that
trains many arms): release compiled programs, or only when the process nears the kernel's
limit on memory mappings.

Every XLA:CPU executable holds a few memory mappings of its code; a process that compiles
thousands of programs passes Linux's ``vm.max_map_count`` (65530 by default) and crashes
inside XLA's compiler. Dropping JAX's caches and ours frees them.
"""

from __future__ import annotations

import gc
import os

import jax

from mythos_jax.inference.generate import compiled_decoder
from mythos_jax.train.evaluate import eval_fn


def release_compiled_programs() -> None:
    """Drop every cached compiled function (JAX's and mythos-jax's) and collect garbage."""
    compiled_decoder.cache_clear()
    eval_fn.cache_clear()
    jax.clear_caches()
    gc.collect()


def memory_mappings() -> tuple[int, int] | None:
    """(mappings this process holds, the kernel's ``vm.max_map_count``), or None where
    ``/proc`` does not tell (not Linux)."""
    try:
        with open(f"/proc/{os.getpid()}/maps", "rb") as maps:
            held = sum(1 for _ in maps)
        with open("/proc/sys/vm/max_map_count") as limit:
            return held, int(limit.read())
    except (OSError, ValueError):
        return None


def release_near_map_limit(fraction: float = 0.3) -> bool:
    """:func:`release_compiled_programs` once the process holds more than ``fraction`` of
    ``vm.max_map_count`` mappings (always where that is unknown); whether it released."""
    mappings = memory_mappings()
    if mappings is not None and mappings[0] <= fraction * mappings[1]:
        return False
    release_compiled_programs()
    return True
