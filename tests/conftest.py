"""Test setup: 8 fake CPU devices, a persistent compilation cache, fp32-exact matmuls."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("MYTHOS_JAX_CACHE", os.path.expanduser("~/.cache/mythos-jax/xla")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_default_matmul_precision", "highest")
