"""How a command sets JAX up for its process: off an absent TPU (with the ``libtpu`` wheel
installed, JAX initialises it on every machine, which prints libtpu's ``E0000 ... unexpected
worker hostname`` and two WARNING lines on a CPU host), and the persistent compilation cache
(``use_compilation_cache``)."""

from __future__ import annotations

import glob
import importlib.util
import os

TPU_DEVICE_GLOBS = ("/dev/accel*", "/dev/vfio/*")
GPU_DEVICE_GLOBS = ("/dev/nvidia*", "/dev/kfd")


def tpu_present() -> bool:
    """Whether this host shows TPU chips (``/dev/accel*`` on v4/v5p, VFIO on v5e/v6e)."""
    return any(glob.glob(pattern) for pattern in TPU_DEVICE_GLOBS)


def skip_absent_tpu() -> None:
    """Restrict JAX to the CPU when libtpu is installed but no TPU (nor a GPU) is here, the
    user left ``JAX_PLATFORMS`` unset, and no backend has started yet."""
    import jax
    from jax._src import xla_bridge

    if (os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms
            or xla_bridge.backends_are_initialized()
            or importlib.util.find_spec("libtpu") is None
            or tpu_present() or any(glob.glob(p) for p in GPU_DEVICE_GLOBS)):
        return
    jax.config.update("jax_platforms", "cpu")


CACHE_MAX_BYTES = 8 << 30


def use_compilation_cache() -> None:
    """With ``$MYTHOS_JAX_CACHE`` set, persist compiled programs there across runs (a resumed
    run skips compiling). A size bound is set so that JAX takes its file lock around every
    read and write: processes that share the directory (``launch.sh --local``, the test suite)
    never read an entry another one is writing. Off by default: a run killed mid-write leaves
    a truncated entry that the next start would read."""
    import jax
    directory = os.environ.get("MYTHOS_JAX_CACHE")
    if directory and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        if jax.config.jax_compilation_cache_max_size == -1:
            jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
