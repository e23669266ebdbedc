"""Pure-JAX references of the MLA kernels: the same math, materialising every score.

They are the oracles of the kernel tests and the XLA fallback of the kernels' entry points.
Numerics follow ``layers/attention.py``: scores ``(q . k) * scale`` in fp32, -inf where masked,
softmax in fp32, probabilities cast to the value dtype before the value product.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mythos_jax.kernels.masks import causal_start_mask, key_range_mask


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    return jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)


def mla_flash_reference(q_nope, q_rope, k_nope, k_rope, v, kv_start, *, scale: float):
    """Causal MLA attention with left padding (see ``masks``).

    q_nope (B, H, T, nope), q_rope (B, H, T, rope), k_nope (B, H, T, nope), k_rope (B, T, rope)
    shared by every head, v (B, H, T, v_dim), kv_start (B,) -> (B, H, T, v_dim), v's dtype.
    """
    scores = (jnp.einsum("bhtd,bhsd->bhts", q_nope, k_nope, preferred_element_type=jnp.float32)
              + jnp.einsum("bhtr,bsr->bhts", q_rope, k_rope, preferred_element_type=jnp.float32))
    mask = causal_start_mask(kv_start, q_nope.shape[2])[:, None]
    probs = masked_softmax(scores * scale, mask).astype(v.dtype)
    return jnp.einsum("bhts,bhsd->bhtd", probs, v)


def mla_decode_reference(q_latent, q_rope, c_kv, k_rope, kv_start, kv_end, *, scale: float):
    """Absorbed MLA decode over the latent cache: one query per head.

    q_latent (B, H, kv_lora) = q_nope with k_up folded in, q_rope (B, H, rope),
    c_kv (B, S, kv_lora), k_rope (B, S, rope), valid keys [kv_start, kv_end) (B,) ->
    (B, H, kv_lora) in c_kv's dtype (the latent output; v_up is applied by the caller).
    A sequence with no valid key gives NaN here (the kernel gives 0).
    """
    scores = (jnp.einsum("bhc,bsc->bhs", q_latent, c_kv, preferred_element_type=jnp.float32)
              + jnp.einsum("bhr,bsr->bhs", q_rope, k_rope, preferred_element_type=jnp.float32))
    mask = key_range_mask(kv_start, kv_end, c_kv.shape[1])[:, None]
    probs = masked_softmax(scores * scale, mask).astype(c_kv.dtype)
    return jnp.einsum("bhs,bsc->bhc", probs, c_kv)
