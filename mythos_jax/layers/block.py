"""Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + ffn(norm(x))``."""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from mythos_jax.config import MythosConfig
from mythos_jax.kernels.masks import KeySpan
from mythos_jax.layers.attention import make_attention
from mythos_jax.layers.common import compute_dtype, dropout, split_key
from mythos_jax.layers.ffn import SwiGLU
from mythos_jax.layers.norm import RMSNorm
from mythos_jax.moe.layer import MoE
from mythos_jax.moe.stats import RouterStats
from mythos_jax.parallel.rules import constrain

HIDDEN_AXES = ("batch", "seq", "act_embed")   # logical axes of the residual stream (B, T, D)


class TransformerBlock(nnx.Module):
    """Attention (MLA or GQA) + FFN (dense SwiGLU, or the MoE inside the recurrent block)."""

    def __init__(self, cfg: MythosConfig, *, use_moe: bool, rngs: nnx.Rngs):
        self.dropout_rate = cfg.dropout
        self.attn_norm = RMSNorm(cfg.dim)
        self.attn = make_attention(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.dim)
        self.ffn = (MoE(cfg, rngs=rngs) if use_moe
                    else SwiGLU(cfg.dim, cfg.dense_hidden, rngs=rngs, dtype=compute_dtype(cfg)))

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], span: KeySpan,
                 key: jax.Array | None = None, cache: dict | None = None, index=None,
                 observe: Callable[[jax.Array], None] | None = None
                 ) -> tuple[jax.Array, dict | None, RouterStats | None]:
        """x (B, T, D) fp32 residual stream -> ((B, T, D), new layer cache or None, the MoE's
        RouterStats or None for a dense block); ``key`` drives dropout (None: off),
        ``span``, ``cache`` and ``index`` as in attention. ``observe``: called (while
        tracing, it adds nothing to the program) with the FFN's input (B, T, D)."""
        attn_key, attn_out_key, ffn_out_key = split_key(key, 3)
        x = constrain(x, HIDDEN_AXES)
        attn_out, cache = self.attn(self.attn_norm(x), rope, span, attn_key, cache, index)
        x = x + dropout(attn_out, self.dropout_rate, attn_out_key)
        if observe is not None:
            observe(self.ffn_norm(x))
        ffn_out, stats = (self.ffn(self.ffn_norm(x)) if isinstance(self.ffn, MoE)
                          else (self.ffn(self.ffn_norm(x)), None))
        x = x + dropout(ffn_out, self.dropout_rate, ffn_out_key)
        return constrain(x, HIDDEN_AXES), cache, stats
