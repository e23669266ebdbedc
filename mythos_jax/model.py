"""OpenMythos: embed -> prelude -> looped recurrent block -> coda -> norm -> tied head.

    model = OpenMythos(cfg, rngs=nnx.Rngs(0))
    logits = model(input_ids, n_loops=None)        # (B, T) int -> (B, T, vocab) fp32
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mythos_jax.config import MythosConfig
from mythos_jax.layers.attention import causal_mask
from mythos_jax.layers.block import TransformerBlock
from mythos_jax.layers.common import compute_dtype, normal_init, split_key
from mythos_jax.layers.norm import RMSNorm
from mythos_jax.layers.recurrence import RecurrentBlock
from mythos_jax.layers.rope import rope_cos_sin


class OpenMythos(nnx.Module):
    """The Recurrent-Depth Transformer of OpenMythos, numerically equal to open-mythos 0.5.0.

    Dropout (``cfg.dropout > 0``) is drawn from the ``dropout`` stream of the ``rngs`` given at
    construction and is active until ``model.eval()`` (``model.train()`` turns it back on).
    """

    def __init__(self, cfg: MythosConfig, *, rngs: nnx.Rngs):
        if not isinstance(cfg, MythosConfig):
            raise TypeError(f"cfg must be a mythos_jax.MythosConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.embed = nnx.Param(normal_init(rngs.params(), (cfg.vocab_size, cfg.dim)),
                               logical_axes=("vocab", "embed"))
        self.prelude = nnx.List([TransformerBlock(cfg, use_moe=False, rngs=rngs)
                                 for _ in range(cfg.prelude_layers)])
        self.recurrent = RecurrentBlock(cfg, rngs=rngs)
        self.coda = nnx.List([TransformerBlock(cfg, use_moe=False, rngs=rngs)
                              for _ in range(cfg.coda_layers)])
        self.norm = RMSNorm(cfg.dim)
        self.deterministic = False
        self.dropout_rngs = nnx.Rngs(dropout=rngs.dropout()) if cfg.dropout > 0 else None

    def __call__(self, input_ids: jax.Array, n_loops: int | None = None) -> jax.Array:
        """input_ids (B, T) integer -> logits (B, T, vocab_size) fp32.

        ``n_loops`` (default ``cfg.max_loop_iters``) may exceed ``max_loop_iters``: the
        depth-wise LoRA then reuses its last scale, as in OpenMythos.

        Checks: shape, dtype and T <= max_seq_len raise ``ValueError`` at once. Token ids are
        checked against ``[0, vocab_size)``: with concrete arrays a ``ValueError`` is raised
        before any compute; under an outer ``jit`` the check runs on the host through a
        callback and an out-of-range id fails the computation with an error naming it (a
        ``ValueError`` inside JAX's runtime error) instead of returning wrapped embeddings.
        """
        n_loops = self._check_n_loops(n_loops)
        self._check_input_ids(input_ids)
        cfg = self.cfg
        T = input_ids.shape[1]
        key = self._dropout_key()
        prelude_keys = split_key(key, cfg.prelude_layers + cfg.coda_layers + 1)
        rope_dim = cfg.qk_rope_head_dim if cfg.attn_type == "mla" else cfg.head_dim
        rope = rope_cos_sin(jnp.arange(T), rope_dim, cfg.rope_theta)
        mask = causal_mask(T)

        x = jnp.take(self.embed[...], input_ids, axis=0)
        for layer, layer_key in zip(self.prelude, prelude_keys):
            x = layer(x, rope, mask, layer_key)
        x = self.recurrent(x, rope, mask, n_loops, prelude_keys[-1])
        for layer, layer_key in zip(self.coda, prelude_keys[cfg.prelude_layers:-1]):
            x = layer(x, rope, mask, layer_key)
        dt = compute_dtype(cfg)
        return jnp.einsum("btd,vd->btv", self.norm(x).astype(dt), self.embed[...].astype(dt),
                          preferred_element_type=jnp.float32)

    # ------------------------------------------------------------------ boundary checks
    def _dropout_key(self) -> jax.Array | None:
        if self.dropout_rngs is None or self.deterministic:
            return None
        return self.dropout_rngs.dropout()

    def _check_n_loops(self, n_loops) -> int:
        if n_loops is None:
            return self.cfg.max_loop_iters
        if isinstance(n_loops, (bool, np.bool_)) or not isinstance(n_loops, (int, np.integer)):
            raise TypeError(f"n_loops must be a Python int or None, got {type(n_loops).__name__}")
        if n_loops < 1:
            raise ValueError(f"n_loops must be >= 1, got {n_loops}")
        return int(n_loops)

    def _check_input_ids(self, input_ids) -> None:
        shape = getattr(input_ids, "shape", None)
        if shape is None or len(shape) != 2:
            raise ValueError(f"input_ids must have shape (batch, seq_len), got {shape}")
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        if shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"input_ids has seq_len {shape[1]} > max_seq_len "
                             f"{self.cfg.max_seq_len} (MythosConfig.max_seq_len)")
        if 0 in shape:
            raise ValueError(f"input_ids must not be empty, got shape {shape}")
        if isinstance(input_ids, jax.core.Tracer):
            jax.debug.callback(_raise_if_out_of_vocab, jnp.min(input_ids), jnp.max(input_ids),
                               self.cfg.vocab_size)
        else:
            ids = np.asarray(input_ids)
            _raise_if_out_of_vocab(ids.min(), ids.max(), self.cfg.vocab_size)


def _raise_if_out_of_vocab(lowest, highest, vocab_size: int) -> None:
    if lowest < 0 or highest >= vocab_size:
        raise ValueError(f"input_ids contain token id(s) outside [0, vocab_size={vocab_size}): "
                         f"min {int(lowest)}, max {int(highest)}")
