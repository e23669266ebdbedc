"""Process-wide housekeeping for long-running processes (the test suite, an experiment that
trains many arms, ``mythos-jax plan`` compiling many steps): release compiled programs, and
give freed memory back to the system.

Every XLA:CPU executable holds a few memory mappings of its code; a process that compiles
thousands of programs passes Linux's ``vm.max_map_count`` (65530 by default) and crashes
inside XLA's compiler. Dropping JAX's caches and ours frees them.

glibc keeps memory freed by other threads in their arenas: after libtpu compiles a 1B-parameter
step the process held 6.0 GiB, of which ``malloc_trim`` returned 3.6; without it every compile
added ~3 GiB and planning every experiment's arms passed 23 GiB (2026-12-06, libtpu 0.0.50.1).
"""

from __future__ import annotations

import ctypes
import gc

import jax

from mythos_jax.inference.generate import decoder_by_value
from mythos_jax.train.evaluate import eval_fn


def release_compiled_programs() -> None:
    """Drop every cached compiled function (JAX's and mythos-jax's) and collect garbage."""
    decoder_by_value.cache_clear()
    eval_fn.cache_clear()
    jax.clear_caches()
    gc.collect()


def return_freed_memory() -> None:
    """Hand memory that glibc's allocator keeps after frees back to the system
    (``malloc_trim``); nothing where the C library has no such call."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)     # the process's own symbols
    if trim is not None:
        trim(0)
