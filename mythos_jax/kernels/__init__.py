"""Pallas kernels for Multi-Latent Attention, each with a pure-JAX reference (``reference``).

  mla_flash_attention   causal flash attention for training and prefill (fwd + bwd kernels)
  mla_decode_attention  absorbed latent attention of one new token over the cache (decode)
Backends: GPU (Triton) and TPU (Mosaic); interpret mode elsewhere; ``tokamax_attention`` runs
the flash attention through tokamax (optional dependency). ``dispatch`` resolves
``MythosConfig.attention_impl``.
"""

from mythos_jax.kernels.dispatch import KernelTarget, kernel_target, resolve_attention_impl
from mythos_jax.kernels.mla_decode import DecodeBlocks, mla_decode_attention
from mythos_jax.kernels.mla_flash import FlashBlocks, mla_flash_attention
from mythos_jax.kernels.reference import mla_decode_reference, mla_flash_reference

__all__ = ["DecodeBlocks", "FlashBlocks", "KernelTarget", "kernel_target",
           "mla_decode_attention", "mla_decode_reference", "mla_flash_attention",
           "mla_flash_reference", "resolve_attention_impl"]
