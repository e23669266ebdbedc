"""OpenMythos: embed -> prelude -> looped recurrent block -> coda -> norm -> tied head.

    model = OpenMythos(cfg, rngs=nnx.Rngs(0))
    logits = model(input_ids, n_loops=None)        # (B, T) int -> (B, T, vocab) fp32
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mythos_jax import loops
from mythos_jax.config import MythosConfig
from mythos_jax.layers.attention import causal_mask
from mythos_jax.layers.block import HIDDEN_AXES, TransformerBlock
from mythos_jax.layers.common import compute_dtype, normal_init, split_key
from mythos_jax.layers.norm import RMSNorm
from mythos_jax.layers.recurrence import RecurrentBlock
from mythos_jax.layers.rope import rope_cos_sin
from mythos_jax.parallel.rules import constrain

LOGIT_AXES = ("batch", "seq", "act_vocab")


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
        self.prelude_norm = RMSNorm(cfg.dim) if cfg.prelude_norm else None
        self.recurrent = RecurrentBlock(cfg, rngs=rngs)
        self.readout = (nnx.Linear(cfg.dim, cfg.dim, use_bias=False, rngs=rngs,
                                   kernel_init=_parcae_readout_init(cfg.dim),
                                   kernel_metadata={"logical_axes": ("embed", "embed_out")})
                        if cfg.readout else None)
        self.coda = nnx.List([TransformerBlock(cfg, use_moe=False, rngs=rngs)
                              for _ in range(cfg.coda_layers)])
        self.norm = RMSNorm(cfg.dim)
        self.deterministic = False
        self.dropout_rngs = nnx.Rngs(dropout=rngs.dropout()) if cfg.dropout > 0 else None

    def __call__(self, input_ids: jax.Array, n_loops=None, *, exit: str | None = None,
                 exit_threshold: float = 1e-3, backprop_depth: int | None = None,
                 max_loops: int | None = None, return_info: bool = False):
        """input_ids (B, T) integer -> logits (B, T, vocab_size) fp32 [, LoopInfo].

        ``n_loops`` (default ``cfg.max_loop_iters``; may exceed it, the depth-wise LoRA then
        reuses its last scale as in OpenMythos):
          * a Python int: exactly that many loops, one ``lax.scan`` (recompiles per count);
          * an int array, scalar or per sequence (B,), possibly traced: chosen at run time,
            one compiled program for every count (``lax.while_loop``, inference only);
        ``exit`` ("act" | "kl" | "kl_entropy" | "delta", with ``exit_threshold``): stop a sequence early,
        see :func:`mythos_jax.loops.run_dynamic`. For training with run-time counts give
        ``backprop_depth`` (gradient through the last k loops) or the static bound
        ``max_loops`` (full backprop), see :func:`mythos_jax.loops.run_training`.
        ``return_info``: also return ``LoopInfo(loops_run (B,), ponder_cost (B, T), moe, state_rms (B,))``,
        ``moe`` the router statistics of the loop (:class:`mythos_jax.layers.moe.MoEStats`:
        load (E,), load_per_loop (L, E), aux_loss, z_loss, dropped).
        Under a mesh (``jax.set_mesh``) the embeddings, every block's input and output and the
        logits are constrained to their logical axes (``mythos_jax.parallel.rules``).

        Checks: shape, dtype and T <= max_seq_len raise ``ValueError`` at once. Token ids are
        checked against ``[0, vocab_size)``: with concrete arrays a ``ValueError`` is raised
        before any compute; under an outer ``jit`` the check runs on the host through a
        callback and an out-of-range id fails the computation with an error naming it (a
        ``ValueError`` inside JAX's runtime error) instead of returning wrapped embeddings.
        Loop counts are checked the same way (>= 1, <= max_loops).
        """
        self._check_input_ids(input_ids)
        cfg = self.cfg
        T = input_ids.shape[1]
        keys = split_key(self._dropout_key(), cfg.prelude_layers + cfg.coda_layers + 1)
        prelude_keys, loop_key, coda_keys = (keys[:cfg.prelude_layers], keys[cfg.prelude_layers],
                                             keys[cfg.prelude_layers + 1:])
        rope_dim = cfg.qk_rope_head_dim if cfg.attn_type == "mla" else cfg.head_dim
        rope = rope_cos_sin(jnp.arange(T), rope_dim, cfg.rope_theta)
        mask = causal_mask(T)

        x = self._embed(input_ids)
        for layer, key in zip(self.prelude, prelude_keys):
            x, _, _ = layer(x, rope, mask, key)
        if self.prelude_norm is not None:
            x = self.prelude_norm(x)
        ctx = loops.LoopContext(rope, mask, loop_key)
        state, loops_run = self._run_loops(x, ctx, n_loops, exit, exit_threshold,
                                           backprop_depth, max_loops,
                                           lambda h: jax.nn.log_softmax(
                                               self._decode(h, rope, mask, coda_keys)))
        logits = self._decode(self.recurrent.readout(state), rope, mask, coda_keys)
        if not return_info:
            return logits
        return logits, loops.LoopInfo(loops_run, self.recurrent.ponder_cost(state, loops_run),
                                      state.moe.totals(),
                                      jnp.sqrt(jnp.mean(jnp.square(state.h), axis=(1, 2))))

    def _run_loops(self, e, ctx, n_loops, exit, exit_threshold, backprop_depth, max_loops,
                   decode):
        """Pick the loop driver for these arguments (see ``__call__``)."""
        if exit is not None and exit not in loops.EXIT_RULES:
            raise ValueError(f"exit must be one of {loops.EXIT_RULES} or None, got {exit!r}")
        if exit == "act" and self.cfg.act == "off":
            raise ValueError("exit='act' needs ACT halting; MythosConfig.act is 'off'")
        if backprop_depth is not None and (not isinstance(backprop_depth, int)
                                           or backprop_depth < 1):
            raise ValueError(f"backprop_depth must be an int >= 1, got {backprop_depth!r}")
        if exit is not None and backprop_depth is not None:
            raise ValueError("early exit is for inference; it cannot be combined with "
                             "backprop_depth")
        if n_loops is None:
            n_loops = self.cfg.max_loop_iters
        static = isinstance(n_loops, (int, np.integer)) and not isinstance(n_loops, bool)
        if not static and not hasattr(n_loops, "dtype"):
            raise TypeError(f"n_loops must be an int, an integer array or None, got "
                            f"{type(n_loops).__name__}")
        loops.check_counts(n_loops, max_loops)
        if backprop_depth is not None or (max_loops is not None and exit is None):
            return loops.run_training(self.recurrent, e, ctx, n_loops, backprop_depth, max_loops)
        if static and exit is None:
            return loops.run_static(self.recurrent, e, ctx, int(n_loops))[:2]
        return loops.run_dynamic(self.recurrent, e, ctx, n_loops, exit, exit_threshold,
                                 decode)[:2]

    def forward_cached(self, input_ids: jax.Array, cache, n_loops: int, last_only: bool = False,
                       exit: str | None = None, exit_threshold: float = 1e-3,
                       return_loops: bool = False, share_depths: bool = False):
        """Prefill (T > 1, into an empty cache) or decode (T == 1) with a preallocated
        :class:`~mythos_jax.inference.cache.KVCache`: input_ids (B, T) ->
        (logits (B, T, vocab), cache advanced by T). Positions and masks come from the cache:
        slot ``index + i``, position ``slot - start_b``; padding slots are never attended.
        ``n_loops`` (static) must equal the depths the cache holds: other depths would have no
        keys for earlier tokens (OpenMythos silently attends to nothing there).
        ``last_only``: logits of the last position only, (B, 1, vocab) (prefill for sampling).
        ``exit`` ("act" | "kl" | "delta"): each sequence stops looping when its rule fires
        (:func:`mythos_jax.loops.run_dynamic`); a stopped sequence is frozen while the others
        go on, and its keys at the remaining depths come from its frozen state (then from the
        last depth run), so later tokens always find keys at every depth. This approximates
        the full-depth model (OpenMythos runs every loop with a cache). ``return_loops``: also
        return the loops run per sequence (B,). ``share_depths``: the cache holds fewer depth
        slots than loops and depth t uses slot ``t mod slots`` (Huginn's KV sharing: with one
        slot, earlier tokens are seen through the keys of the last depth that wrote them).
        A prefill (T > 1) must start an empty cache (no chunked prefill: checked on the host).
        Token ids are range-checked only when concrete (``generate`` checks its prompts; a
        traced check would cost a host round trip per decoded token)."""
        self._check_input_ids(input_ids, check_traced=False)
        cfg = self.cfg
        if not isinstance(n_loops, int) or n_loops < 1 or (
                not share_depths and n_loops != cache.n_loops):
            raise ValueError(f"n_loops must equal the {cache.n_loops} loop depths this cache "
                             f"holds (a depth the prompt never filled would be attended as "
                             f"zeros; share_depths=True reuses slots), got {n_loops!r}")
        B, T = input_ids.shape
        slots = cache.index + jnp.arange(T, dtype=jnp.int32)
        positions = jnp.maximum(slots[None, :] - cache.start[:, None], 0)     # (B, T)
        rope_dim = cfg.qk_rope_head_dim if cfg.attn_type == "mla" else cfg.head_dim
        rope = rope_cos_sin(positions, rope_dim, cfg.rope_theta)
        if T == 1:   # decode: every written, non-padding slot of the cache
            keys = jnp.arange(cache.max_len, dtype=jnp.int32)
            mask = (keys >= cache.start[:, None]) & (keys <= cache.index)
            mask = mask[:, None, :]
        else:        # prefill: causal over the prompt, padding masked (a pad row sees itself)
            jax.debug.callback(_raise_if_cache_not_empty, cache.index)
            mask = causal_mask(T) & (jnp.arange(T)[None, None, :] >= cache.start[:, None, None])
            mask = mask | jnp.eye(T, dtype=bool)[None]
        x = self._embed(input_ids)
        prelude_caches = []
        for layer, layer_cache in zip(self.prelude, cache.prelude):
            x, layer_cache, _ = layer(x, rope, mask, None, layer_cache, cache.index)
            prelude_caches.append(layer_cache)
        if self.prelude_norm is not None:
            x = self.prelude_norm(x)
        ctx = loops.LoopContext(rope, mask, None)
        if exit is None:
            state, loops_run, recurrent_cache = loops.run_static(
                self.recurrent, x, ctx, n_loops, cache.recurrent, cache.index)
        else:
            def log_probs(h):   # coda over the cache, read only, for the "kl" rule
                coda_out, _ = self._coda(h, rope, mask, [None] * cfg.coda_layers, cache.coda,
                                         cache.index)
                return jax.nn.log_softmax(self._head(coda_out))
            state, loops_run, recurrent_cache = loops.run_dynamic(
                self.recurrent, x, ctx, jnp.int32(n_loops), exit, exit_threshold, log_probs,
                cache.recurrent, cache.index)
        x, coda_caches = self._coda(self.recurrent.readout(state), rope, mask,
                                    [None] * cfg.coda_layers, cache.coda, cache.index)
        cache = cache._replace(prelude=tuple(prelude_caches), recurrent=recurrent_cache,
                               coda=tuple(coda_caches), index=cache.index + T)
        logits = self._head(x[:, -1:] if last_only else x)
        return (logits, cache, loops_run) if return_loops else (logits, cache)

    def _coda(self, x, rope, mask, coda_keys, caches=None, index=None):
        """Read-out and coda layers: (B, T, D) -> (B, T, D) and the coda caches."""
        if self.readout is not None:
            x = self.readout(x)
        caches = caches if caches is not None else [None] * len(self.coda)
        new_caches = []
        for layer, key, layer_cache in zip(self.coda, coda_keys, caches):
            x, layer_cache, _ = layer(x, rope, mask, key, layer_cache, index)
            new_caches.append(layer_cache)
        return x, new_caches

    def _decode(self, x, rope, mask, coda_keys) -> jax.Array:
        """Loop output (B, T, D) -> logits (B, T, vocab) fp32: read-out, coda, norm, tied head."""
        return self._head(self._coda(x, rope, mask, coda_keys)[0])

    def _embed(self, input_ids) -> jax.Array:
        """Token ids (B, T) -> embeddings (B, T, D) fp32 (no scaling, as in OpenMythos)."""
        return constrain(jnp.take(self.embed[...], input_ids, axis=0), HIDDEN_AXES)

    def _head(self, x) -> jax.Array:
        """Final norm and the tied output head: (B, T, D) -> (B, T, vocab) fp32."""
        dt = compute_dtype(self.cfg)
        logits = jnp.einsum("btd,vd->btv", self.norm(x).astype(dt), self.embed[...].astype(dt),
                            preferred_element_type=jnp.float32)
        return constrain(logits, LOGIT_AXES)

    # ------------------------------------------------------------------ boundary checks
    def _dropout_key(self) -> jax.Array | None:
        if self.dropout_rngs is None or self.deterministic:
            return None
        return self.dropout_rngs.dropout()

    def _check_input_ids(self, input_ids, check_traced: bool = True) -> None:
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
            if check_traced:
                jax.debug.callback(raise_if_out_of_vocab, jnp.min(input_ids), jnp.max(input_ids),
                                   self.cfg.vocab_size)
        else:
            ids = np.asarray(input_ids)
            raise_if_out_of_vocab(ids.min(), ids.max(), self.cfg.vocab_size)


def _raise_if_cache_not_empty(index) -> None:
    if int(index) != 0:
        raise ValueError(f"a multi-token forward_cached call (prefill) needs an empty cache, but "
                         f"it already holds {int(index)} tokens (chunked prefill is not supported)")


def _parcae_readout_init(dim: int):
    """Parcae's read-out C: truncated normal (+-3 std), std sqrt(2 / (5 dim))."""
    return nnx.initializers.truncated_normal(stddev=(2.0 / (5.0 * dim)) ** 0.5, lower=-3.0,
                                             upper=3.0)


def raise_if_out_of_vocab(lowest, highest, vocab_size: int) -> None:
    if lowest < 0 or highest >= vocab_size:
        raise ValueError(f"input_ids contain token id(s) outside [0, vocab_size={vocab_size}): "
                         f"min {int(lowest)}, max {int(highest)}")
