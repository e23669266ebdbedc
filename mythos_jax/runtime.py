"""Process-wide housekeeping for long-running processes (the test suite, an experiment that
trains many arms): release compiled programs.

Every XLA:CPU executable holds a few memory mappings of its code; a process that compiles
thousands of programs passes Linux's ``vm.max_map_count`` (65530 by default) and crashes
inside XLA's compiler. Dropping JAX's caches and ours frees them.
"""

from __future__ import annotations

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
