"""Causal self-attention: Grouped-Query Attention and Multi-Latent Attention (DeepSeek-V2).

Both follow OpenMythos's numerics: scores ``(q . k) * scale`` with the scale applied after the
dot product, -inf where masked, softmax in fp32, dropout on the probabilities.
``span`` (``kernels.masks.KeySpan``) says which keys each query sees, as offsets; the einsum
path turns it into a dense (B, T, S) mask, the kernels take the offsets.

With a layer cache (see ``mythos_jax.inference.cache``) the new keys are written at each
sequence's slot ``index`` (B,) and returned, and the queries attend over the whole cache
(decode, chunked prefill); ``index`` None means an empty cache: the keys go to slots 0..
and the queries attend over the new tokens only (a first prefill). Calls return
``(output, new_cache)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mythos_jax.config import MythosConfig
from mythos_jax.inference.cache import update_rows
from mythos_jax.kernels.dispatch import log_once, resolve_attention_impl
from mythos_jax.kernels.masks import KeySpan
from mythos_jax.kernels.mla_decode import mla_decode_attention
from mythos_jax.kernels.mla_flash import mla_flash_attention
from mythos_jax.layers.common import compute_dtype, dropout, linear
from mythos_jax.layers.norm import RMSNorm
from mythos_jax.layers.rope import apply_rope
from mythos_jax.modes import AttentionImpl, AttentionType
from mythos_jax.parallel.rules import activation_spec


def masked_softmax(scores: jax.Array, span: KeySpan, rate: float,
                   key: jax.Array | None) -> jax.Array:
    """scores (B, ..., T, S) fp32 -> probabilities over the keys ``span`` allows, dropout
    applied."""
    mask = span.dense(*scores.shape[-2:])
    mask = mask.reshape(mask.shape[0], *([1] * (scores.ndim - 3)), *mask.shape[-2:])
    probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
    return dropout(probs, rate, key)


class GQAttention(nnx.Module):
    """Grouped-query attention; query head h reads key/value head h // (n_heads // n_kv_heads)."""

    def __init__(self, cfg: MythosConfig, *, rngs: nnx.Rngs):
        dt = compute_dtype(cfg)
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.dropout_rate = cfg.dropout
        self.wq = linear(cfg.dim, cfg.n_heads * cfg.head_dim, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wk = linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, ("embed", "kv_heads"), rngs=rngs,
                         dtype=dt)
        self.wv = linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, ("embed", "kv_heads"), rngs=rngs,
                         dtype=dt)
        self.wo = linear(cfg.n_heads * cfg.head_dim, cfg.dim, ("heads", "embed"), rngs=rngs, dtype=dt)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], span: KeySpan,
                 key: jax.Array | None = None, cache: dict | None = None, index=None):
        """x (B, T, D), rope = cos/sin (T|B,T, head_dim/2) -> ((B, T, D), new cache or None)."""
        B, T, _ = x.shape
        groups = self.n_heads // self.n_kv_heads
        q = apply_rope(self.wq(x).reshape(B, T, self.n_heads, self.head_dim), *rope)
        k = apply_rope(self.wk(x).reshape(B, T, self.n_kv_heads, self.head_dim), *rope)
        v = self.wv(x).reshape(B, T, self.n_kv_heads, self.head_dim)
        new_cache = None if cache is None else write_cache(cache, {"k": k, "v": v}, index)
        if cache is not None and index is not None:        # attend over the cache
            k, v = new_cache["k"].astype(q.dtype), new_cache["v"].astype(q.dtype)
        q = q.reshape(B, T, self.n_kv_heads, groups, self.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
        probs = masked_softmax(scores * self.head_dim ** -0.5, span, self.dropout_rate, key)
        out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)
        return self.wo(out.reshape(B, T, self.n_heads * self.head_dim)), new_cache


class MLAttention(nnx.Module):
    """Multi-latent attention with a low-rank query and a compressed key/value latent ``c_kv``.

    Queries are ``[q_nope | q_rope]`` per head; keys are ``[k_nope | k_rope]`` where k_nope and
    v come from ``kv_up(kv_norm(c_kv))`` (per head, laid out ``[k_nope | v]``) and k_rope is ONE
    rotated head shared by all query heads (OpenMythos stores H identical copies; same values).
    With ``cfg.attention_impl`` resolving to "pallas" the Pallas kernels run instead of the
    einsums (``mythos_jax.kernels``): flash attention without and latent decode with a cache;
    with "tokamax", tokamax's flash attention without a cache (decode stays on the einsums).
    """

    def __init__(self, cfg: MythosConfig, *, rngs: nnx.Rngs):
        dt = compute_dtype(cfg)
        self.n_heads = cfg.n_heads
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                                                    cfg.v_head_dim)
        self.dropout_rate = cfg.dropout
        self.attention_impl = cfg.attention_impl
        H = cfg.n_heads
        self.q_down = linear(cfg.dim, cfg.q_lora_rank, ("embed", "q_lora"), rngs=rngs, dtype=dt)
        self.q_norm = RMSNorm(cfg.q_lora_rank, axis_name="q_lora")
        self.q_up_nope = linear(cfg.q_lora_rank, H * self.nope_dim, ("q_lora", "heads"), rngs=rngs,
                                dtype=dt)
        self.q_up_rope = linear(cfg.q_lora_rank, H * self.rope_dim, ("q_lora", "heads"), rngs=rngs,
                                dtype=dt)
        self.kv_down = linear(cfg.dim, cfg.kv_lora_rank + self.rope_dim, ("embed", "kv_lora"),
                              rngs=rngs, dtype=dt)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, axis_name="kv_lora")
        self.kv_up = linear(cfg.kv_lora_rank, H * (self.nope_dim + self.v_dim), ("kv_lora", "heads"),
                            rngs=rngs, dtype=dt)
        self.wo = linear(H * self.v_dim, cfg.dim, ("heads", "embed"), rngs=rngs, dtype=dt)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], span: KeySpan,
                 key: jax.Array | None = None, cache: dict | None = None, index=None):
        """x (B, T, D), rope = cos/sin (T|B,T, rope/2) -> ((B, T, D), new cache or None)."""
        B, T, _ = x.shape
        H = self.n_heads
        c_q = self.q_norm(self.q_down(x))                                  # (B, T, q_lora)
        q_nope = self.q_up_nope(c_q).reshape(B, T, H, self.nope_dim)
        q_rope = apply_rope(self.q_up_rope(c_q).reshape(B, T, H, self.rope_dim), *rope)
        kv_raw = self.kv_down(x)                                           # (B, T, kv_lora+rope)
        c_kv = self.kv_norm(kv_raw[..., : self.kv_lora_rank])             # normalised latent
        k_rope = apply_rope(kv_raw[..., None, self.kv_lora_rank:], *rope)[:, :, 0]  # (B, T, rope)
        new_cache = (None if cache is None
                     else write_cache(cache, {"c_kv": c_kv, "k_rope": k_rope}, index))
        # kv_up's columns are per head [k_nope | v]: slice the kernel, not the activations.
        kv_up = self.kv_up.kernel[...].astype(self.kv_up.dtype).reshape(
            self.kv_lora_rank, H, self.nope_dim + self.v_dim)
        k_up, v_up = kv_up[..., : self.nope_dim], kv_up[..., self.nope_dim:]
        over_cache = cache is not None and index is not None
        if impl := self._kernel_impl(key, over_cache, T):
            out = self._kernel_attention(q_nope, q_rope, c_kv, k_rope, new_cache, k_up, v_up,
                                         span, over_cache, impl == AttentionImpl.TOKAMAX)
            return self.wo(out.reshape(B, T, H * self.v_dim)), new_cache
        if over_cache:   # attend in latent space over the cache: k_up folded into the query;
            # two score dots, as joining c_kv and k_rope would copy the whole cache per call
            c_kv = new_cache["c_kv"].astype(kv_up.dtype)
            k_rope = new_cache["k_rope"].astype(q_rope.dtype)
            q_latent = jnp.einsum("bthd,chd->bthc", q_nope, k_up)
            content_scores = jnp.einsum("bthc,bsc->bhts", q_latent, c_kv,
                                        preferred_element_type=jnp.float32)
            scores = content_scores + jnp.einsum("bthr,bsr->bhts", q_rope, k_rope,
                                                 preferred_element_type=jnp.float32)
        else:        # expand keys and values from the latent of the current tokens
            c_kv = c_kv.astype(kv_up.dtype)
            scores = jnp.einsum("bthd,bshd->bhts", jnp.concatenate([q_nope, q_rope], -1),
                                full_keys(jnp.einsum("bsc,chd->bshd", c_kv, k_up), k_rope),
                                preferred_element_type=jnp.float32)
        probs = masked_softmax(scores * (self.nope_dim + self.rope_dim) ** -0.5, span,
                               self.dropout_rate, key).astype(c_kv.dtype)
        if over_cache:   # v_up applied after attention
            # heads-major latent output: XLA:CPU runs "->bthc" as a slow generic dot (2.3x)
            out = jnp.einsum("bhtc,chd->bthd", jnp.einsum("bhts,bsc->bhtc", probs, c_kv), v_up)
        else:
            out = jnp.einsum("bhts,bshd->bthd", probs, jnp.einsum("bsc,chd->bshd", c_kv, v_up))
        return self.wo(out.reshape(B, T, H * self.v_dim)), new_cache

    def _kernel_impl(self, key, over_cache: bool, queries: int) -> str | None:
        """"pallas" | "tokamax" when attention_impl resolves to it (at trace time, by the mesh's
        platform), else None (einsums): also for attention dropout in training, which only the
        einsum path has, for decode under "tokamax", and for several queries over a cache
        (chunked prefill; the decode kernel takes one query): the XLA latent einsums."""
        impl = resolve_attention_impl(self.attention_impl)
        if impl == AttentionImpl.XLA or (over_cache and (impl == AttentionImpl.TOKAMAX
                                                         or queries > 1)):
            return None
        if key is not None and self.dropout_rate > 0:
            log_once("MLA attention dropout > 0 in training: XLA attention, not the kernels")
            return None
        return impl

    def _kernel_attention(self, q_nope, q_rope, c_kv, k_rope, cache, k_up, v_up, span, decode,
                          tokamax: bool):
        """The kernels' path -> (B, T, H, v_dim); they take ``span``'s offsets."""
        scale = (self.nope_dim + self.rope_dim) ** -0.5
        if decode:   # absorbed: k_up folded into the query, v_up applied to the latent output
            q_latent = jnp.einsum("bthd,chd->bhc", q_nope, k_up)
            latent = mla_decode_attention(
                q_latent, q_rope[:, 0], cache["c_kv"].astype(k_up.dtype),
                cache["k_rope"].astype(q_rope.dtype), span.kv_start, span.kv_end(), scale=scale,
                spec=activation_spec(("batch", "heads"), q_latent.shape[:2]))
            return jnp.einsum("bhc,chd->bhd", latent, v_up)[:, None]
        c_kv = c_kv.astype(k_up.dtype)
        k_nope = jnp.einsum("bsc,chd->bhsd", c_kv, k_up)         # heads-major (B, H, T, d)
        v = jnp.einsum("bsc,chd->bhsd", c_kv, v_up)
        heads_major = lambda x: x.transpose(0, 2, 1, 3)       # (B, T, H, d) <-> (B, H, T, d)
        return heads_major(mla_flash_attention(
            heads_major(q_nope), heads_major(q_rope), k_nope, k_rope.astype(q_rope.dtype), v,
            span.kv_start, scale=scale, tokamax=tokamax,
            spec=activation_spec(("batch", "heads"), k_nope.shape[:2])))


def full_keys(k_nope: jax.Array, k_rope: jax.Array) -> jax.Array:
    """Per-head keys ``[k_nope | k_rope]``: k_nope (B, S, H, nope), the shared rotated head
    k_rope (B, S, rope) -> (B, S, H, nope + rope); one score dot instead of two and a sum."""
    shared = jnp.broadcast_to(k_rope[:, :, None, :].astype(k_nope.dtype),
                              (*k_nope.shape[:3], k_rope.shape[-1]))
    return jnp.concatenate([k_nope, shared], axis=-1)


def write_cache(cache: dict, entries: dict, index) -> dict:
    """Write the new (B, T, ...) entries into each (B, S, ...) cache array at each sequence's
    slot ``index`` (B,) (None: slot 0)."""
    return {name: update_rows(cache[name], entries[name], index, axis=1) for name in cache}


def make_attention(cfg: MythosConfig, *, rngs: nnx.Rngs) -> GQAttention | MLAttention:
    if cfg.attn_type == AttentionType.MLA:
        return MLAttention(cfg, rngs=rngs)
    return GQAttention(cfg, rngs=rngs)
