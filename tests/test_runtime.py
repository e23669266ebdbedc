"""Releasing compiled programs near the kernel's memory-mapping limit (``mythos_jax.runtime``)."""

import jax
import jax.numpy as jnp

from mythos_jax import runtime


def test_memory_mappings_reads_this_process():
    held, limit = runtime.memory_mappings()
    assert 0 < held < limit


def test_programs_are_released_only_near_the_limit(monkeypatch):
    square = jax.jit(lambda x: x * x)
    square(jnp.ones(3))
    monkeypatch.setattr(runtime, "memory_mappings", lambda: (29, 100))
    assert not runtime.release_near_map_limit(0.3) and square._cache_size() == 1
    monkeypatch.setattr(runtime, "memory_mappings", lambda: (31, 100))
    assert runtime.release_near_map_limit(0.3) and square._cache_size() == 0
    square(jnp.ones(3))
    monkeypatch.setattr(runtime, "memory_mappings", lambda: None)     # unknown: release
    assert runtime.release_near_map_limit(0.3) and square._cache_size() == 0
