"""Test setup: 8 fake CPU devices, fp32-exact matmuls, and a persistent compilation cache only
when ``$MYTHOS_JAX_CACHE`` names one: in a full suite run, writing the cache entry of
``test_parallel``'s sharded training step segfaulted inside jax's executable serialisation
(twice, also with an empty cache; the test passes alone), so CI runs without it.
JAX_PLATFORMS=cpu keeps every test process (and its subprocesses) off the TPU plugin that
the test venv's libtpu would otherwise try to load (``mythos-jax plan`` compiles for TPU
topologies without it)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

if os.environ.get("MYTHOS_JAX_CACHE"):
    jax.config.update("jax_compilation_cache_dir", os.environ["MYTHOS_JAX_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from mythos_jax import OpenMythos, variants  # noqa: E402


@pytest.fixture(scope="module")
def model():
    """A tiny MLA model whose positions halt after a few loops (ACT bias -1): the loop tests'
    model; test modules that need another define their own ``model``."""
    m = OpenMythos(variants.tiny_mla(), rngs=nnx.Rngs(0))
    m.recurrent.act.halt.bias[...] = jnp.full((1,), -1.0)
    return m
