"""Test setup: 8 fake CPU devices, fp32-exact matmuls, XLA:CPU code generated without LLVM
optimisation, a persistent compilation cache fresh for each suite run, and compiled programs
released after each test module.

Why unoptimised code: the suite's programs are tiny, so compiling them is most of its time;
``--xla_backend_optimization_level=0`` turns off LLVM's optimisation of the generated code
only (XLA's HLO passes, fusion and the numerics stay), which took two loop tests from 69 s to
51 s. Benchmarks and commands keep XLA's default.

Why the cache: most of the suite's time is XLA compiling, and the same programs come back:
every ``train()`` builds a new jitted step, so two tests (or two subprocess runs) training the
same config compile it twice. The cache directory is new for each run of the suite (made by
the pytest process, inherited by its xdist workers and the subprocesses they start through
``$MYTHOS_JAX_CACHE``, removed at the end), so no result depends on an earlier run; a set
``$MYTHOS_JAX_CACHE`` is used instead (and kept). Tests whose subprocesses are killed give
those a private copy or none (a killed write leaves a truncated entry).

Why the release: every XLA:CPU executable holds a few memory mappings of its code, and the
suite compiles thousands of programs in one process. Without the release the process passed
Linux's ``vm.max_map_count`` (65530) about three quarters through the suite and segfaulted
inside XLA's compiler (seen in CI, in a different test each time; reproduced here with
``/proc/<pid>/maps`` counted every 15 s: 64,944 mappings at the crash).
JAX_PLATFORMS=cpu keeps every test process (and its subprocesses) off the TPU plugin that
the test venv's libtpu would otherwise try to load (``mythos-jax plan`` compiles for TPU
topologies without it)."""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

OWN_CACHE = None if os.environ.get("MYTHOS_JAX_CACHE") else os.path.join(
    tempfile.gettempdir(), f"mythos-jax-tests-xla-{os.getpid()}")     # xdist workers inherit it
if OWN_CACHE:
    os.environ["MYTHOS_JAX_CACHE"] = OWN_CACHE
# The data fingerprint's file-digest cache: one per suite run too, never the user's.
os.environ.setdefault("MYTHOS_JAX_DIGESTS", os.path.join(
    tempfile.gettempdir(), f"mythos-jax-tests-digests-{os.getpid()}.json"))

import jax  # noqa: E402

from mythos_jax.platforms import use_compilation_cache  # noqa: E402

use_compilation_cache()
jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from mythos_jax import OpenMythos, variants  # noqa: E402
from mythos_jax.runtime import release_compiled_programs  # noqa: E402


def pytest_sessionfinish(session):
    """The process that made the suite's compilation cache removes it at the end."""
    if OWN_CACHE:
        shutil.rmtree(OWN_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def compiled_programs_released_after_module():
    """After each test module, free its compiled programs and their code mappings."""
    yield
    release_compiled_programs()


@pytest.fixture(scope="module")
def halting_model():
    """A tiny MLA model whose positions halt after a few loops (ACT bias -1), for the loop and
    load-balance tests."""
    m = OpenMythos(variants.tiny_mla(), rngs=nnx.Rngs(0))
    m.recurrent.act.halt.bias[...] = jnp.full((1,), -1.0)
    return m
