"""Which attention implementation runs, and which Pallas backend compiles the kernels.

``MythosConfig.attention_impl``:
  "auto"     on a Hopper/Blackwell NVIDIA GPU with tokamax installed "tokamax", on another GPU
             or a TPU "pallas", on CPU "xla" (the default; bit-identical to "xla" there);
  "xla"      the einsum path of ``layers/attention.py``;
  "pallas"   our kernels everywhere; on CPU they run in interpret mode (slow, for tests);
  "tokamax"  training/prefill through tokamax (``tokamax_attention``: Mosaic GPU, Mosaic TPU
             v5+, its XLA implementation on CPU), decode by the XLA latent einsums; where
             tokamax cannot run (package, device, dtype) our kernels run, logged once.
The platform is that of the mesh in force (``jax.set_mesh`` / an abstract mesh with a device,
or the mesh given), so that an ahead-of-time lowering for another platform picks its kernels;
without a mesh it is JAX's default backend.

On CPU the kernels written for one backend are interpreted: the GPU (Triton-style) ones by
default, the TPU (Mosaic-style) ones with ``MYTHOS_JAX_INTERPRET_BACKEND=tpu``.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mythos_jax.kernels import tokamax_attention
from mythos_jax.modes import AttentionImpl

KERNEL_BACKENDS = ("gpu", "tpu")
INTERPRET_BACKEND_ENV = "MYTHOS_JAX_INTERPRET_BACKEND"
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")
KERNEL_DTYPES = tuple(jnp.dtype(d) for d in ("float32", "bfloat16", "float16"))

logger = logging.getLogger("mythos_jax.kernels")
_logged: set[str] = set()


class KernelTarget(NamedTuple):
    """Where a Pallas kernel runs: ``backend`` "gpu" (Triton) or "tpu" (Mosaic), and whether it
    is interpreted (``interpret``: False, True, or ``pltpu.InterpretParams``)."""
    backend: str
    interpret: object = False


def mesh_platform(mesh=None) -> str:
    """"cpu" | "gpu" | "tpu" of ``mesh`` (a Mesh or AbstractMesh), else of the mesh in force,
    else of JAX's default backend."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    abstract = mesh.abstract_mesh if isinstance(mesh, Mesh) else mesh
    device = getattr(abstract, "abstract_device", None)
    platform = device.platform if device is not None else jax.default_backend()
    return "gpu" if platform in _GPU_PLATFORMS else platform


def mesh_device_kind(mesh=None) -> str:
    """``device_kind`` ("NVIDIA H200", "TPU v5p", ...) of the mesh as ``mesh_platform`` finds
    it; "" when an abstract device names none."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    abstract = mesh.abstract_mesh if isinstance(mesh, Mesh) else mesh
    device = getattr(abstract, "abstract_device", None)
    if device is not None:
        return device.device_kind or ""
    return jax.devices()[0].device_kind


def resolve_attention_impl(impl: str, mesh=None) -> str:
    """"auto" | "xla" | "pallas" | "tokamax" -> "xla" | "pallas" | "tokamax" for the platform
    of ``mesh`` (module docstring)."""
    impl = AttentionImpl.parse(impl, "attention_impl")
    if impl != AttentionImpl.AUTO:
        return impl
    platform = mesh_platform(mesh)
    if platform not in KERNEL_BACKENDS:
        return AttentionImpl.XLA
    if platform == "gpu":
        _, reason = tokamax_attention.implementation(platform, mesh_device_kind(mesh))
        if reason is None:
            return AttentionImpl.TOKAMAX
        log_once(f"attention_impl='auto' runs the Pallas Triton kernels, not tokamax: {reason}")
    return AttentionImpl.PALLAS


def attention_table_line(mesh=None) -> str:
    """What ``attention_impl="auto"`` runs here and on the other platforms, in one line."""
    return ("attention_impl 'auto': Hopper/Blackwell GPU + tokamax: tokamax, other GPU: pallas "
            "(Triton), TPU: pallas (Mosaic), CPU: xla; here: "
            f"{resolve_attention_impl(AttentionImpl.AUTO, mesh)}")


def kernel_target(mesh=None) -> KernelTarget:
    """The kernels' backend for the platform of ``mesh``; interpreted on any other platform."""
    platform = mesh_platform(mesh)
    if platform in KERNEL_BACKENDS:
        return KernelTarget(platform, False)
    backend = os.environ.get(INTERPRET_BACKEND_ENV, "gpu")
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"{INTERPRET_BACKEND_ENV} must be one of {KERNEL_BACKENDS}, "
                         f"got {backend!r}")
    return KernelTarget(backend, True)


def unsupported_reason(head_dims: dict[str, int], dtype, target: KernelTarget) -> str | None:
    """Why ``target`` cannot tile these head dims (name -> size) in this dtype, or None.
    Interpret mode runs any shape; Triton needs power-of-two tiles of at least 16."""
    if target.interpret:
        return None
    if jnp.dtype(dtype) not in KERNEL_DTYPES:
        return f"dtype {jnp.dtype(dtype).name} (kernels take float32, bfloat16, float16)"
    if target.backend == "gpu":
        bad = {name: d for name, d in head_dims.items() if d < 16 or d & (d - 1)}
        if bad:
            return f"Triton tiles need power-of-two head dims >= 16, got {bad}"
    return None


def log_once(message: str) -> None:
    """Log ``message`` (a fallback to XLA and its reason) the first time it occurs."""
    if message not in _logged:
        _logged.add(message)
        logger.warning(message)
