"""OpenMythos: embed -> prelude -> looped recurrent block -> coda -> norm -> tied head.

    model = OpenMythos(cfg, rngs=nnx.Rngs(0))
    logits = model(input_ids)                      # (B, T) int -> (B, T, vocab) fp32
    out = model(input_ids, LoopSpec(16, exit="kl"), return_info=True)   # a Forward
    out = model(prompt_ids, 8, cache=init_cache(cfg, B, S, depth_slots=8))   # prefill, then
    out = model(next_ids, 8, cache=out.cache, lengths=n)   # decode / chunked prefill / next turn
    path = model(input_ids, 8, trace=True)         # a Trajectory: every stage, every loop
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mythos_jax import loops as loops_lib
from mythos_jax.config import MythosConfig
from mythos_jax.inference.cache import KVCache
from mythos_jax.kernels.masks import KeySpan
from mythos_jax.layers.block import HIDDEN_AXES, TransformerBlock
from mythos_jax.layers.common import compute_dtype, normal_init, split_key
from mythos_jax.layers.norm import RMSNorm
from mythos_jax.layers.recurrence import RecurrentBlock
from mythos_jax.layers.rope import rope_cos_sin
from mythos_jax.loops import LoopSpec
from mythos_jax.modes import Positions
from mythos_jax.parallel.rules import constrain

LOGIT_AXES = ("batch", "seq", "act_vocab")


class Forward(NamedTuple):
    """A forward's outputs beyond the logits (``OpenMythos.__call__``)."""
    logits: jax.Array                  # (B, T | 1, vocab) fp32
    info: loops_lib.LoopInfo | None    # with return_info
    cache: KVCache | None              # the cache advanced by T, with a cache


class Trajectory(NamedTuple):
    """A traced forward (``OpenMythos.__call__(..., trace=...)``): every stage's output at the
    traced positions P, and what each loop iteration did."""
    logits: jax.Array                  # (B, T | 1, vocab) fp32
    embed: jax.Array                   # (B, P, D) token embeddings
    prelude: tuple[jax.Array, ...]     # (B, P, D) per prelude layer
    loops: loops_lib.LoopRecord        # stacked over the n iterations (n, B, P, ...)
    recurrent: jax.Array               # (B, P, D) the recurrence's output (ACT sum)
    coda: tuple[jax.Array, ...]        # (B, P, D) per coda layer


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

    def __call__(self, input_ids: jax.Array, loops: LoopSpec | int | jax.Array | None = None,
                 *, n_loops: int | jax.Array | None = None,
                 cache: KVCache | None = None, start: jax.Array | None = None,
                 lengths: jax.Array | None = None, last_only: bool = False,
                 return_info: bool = False, host_checks: bool = False,
                 trace: bool | tuple[int, ...] = False):
        """input_ids (B, T) integer -> logits (B, T, vocab_size) fp32, or a :class:`Forward`
        (logits, info, cache) when a ``cache`` is given or ``return_info`` is set, or a
        :class:`Trajectory` with ``trace``.

        ``loops``: a :class:`~mythos_jax.loops.LoopSpec`, or its count alone: None
        (``cfg.max_loop_iters``, or a cache's depth slots; a count may exceed it, the
        depth-wise LoRA then reuses its last scale as in OpenMythos), a Python int (one
        ``lax.scan``, compiled per count), or an int array, scalar or per sequence (B,),
        possibly traced (one ``lax.while_loop`` for every count). Its ``exit`` rule stops
        each sequence early; ``backprop_depth`` / ``max_loops`` make run-time counts
        differentiable (training).
        ``n_loops``: OpenMythos's name for ``loops`` (``model(ids, n_loops=4)``), accepted for
        code ported from PyTorch; give one of the two.
        ``cache`` (:class:`~mythos_jax.inference.cache.KVCache`): prefill into an empty cache
        (left-padded prompts), decode (T == 1) or chunked prefill / a conversation's next turn
        (T > 1 into a filled cache, right-padded); positions and the attention span come from
        the cache (sequence b's token i at slot ``index_b + i``, position ``slot - start_b``;
        padding never attended), the count must be a Python int equal to the cache's depth
        slots (unless it shares depths), and ``Forward.cache`` is the cache advanced by
        ``lengths``. The caller keeps ``index + T <= max_len`` (a concrete cache is checked
        here, ``generate`` checks on the host; a traced write past the end is dropped). With
        an exit rule a stopped sequence's depths past its exit hold copies of its last run
        depth's keys, so later tokens find keys at every depth and a sequence's cache does
        not depend on its batch-mates (this approximates the full-depth model).
        ``start`` (B,) int (no cache): left padding, each row's first real position (its
        position 0; padding never attended). ``lengths`` (B,) int: the real tokens of each
        row, right padding after them (default T); with a cache the index advances by it.
        Exit rules decide on real tokens only. ``last_only``: logits of each row's last real
        token, (B, 1, vocab).
        ``return_info``: ``Forward.info`` is a :class:`~mythos_jax.loops.LoopInfo`
        (loops_run (B,), ponder_cost (B, T), moe (router statistics), state_rms (B,)).
        ``trace``: True (every position) or a tuple of positions (negative from the end):
        return a :class:`Trajectory`, the output of every stage and each loop iteration's
        :class:`~mythos_jax.loops.LoopRecord` (hidden state, halting probability and ACT
        weight, router top-K, rho(A), relative change of h), for a static loop count without
        exit rule or cache. False (the default) leaves the program as it is: nothing traced.
        Under a mesh (``jax.set_mesh``) the embeddings, every block's input and output and the
        logits are constrained to their logical axes (``mythos_jax.parallel.rules``).

        Checks: shape, dtype and T <= max_seq_len raise ``ValueError`` at once; concrete token
        ids outside ``[0, vocab_size)``, bad concrete loop counts and a prefill into a
        non-empty concrete cache too. Traced values (under an outer ``jit``) are checked only
        with ``host_checks=True``: one host callback each, failing the computation with the
        same message; the default keeps jitted steps free of host round trips (the data
        pipeline and ``generate`` check their inputs on the host).
        """
        self._check_inputs(input_ids, cache, start, lengths, host_checks)
        points = _trace_points(trace, input_ids.shape[1], cache, return_info)
        spec = loops_lib.resolve_spec(
            LoopSpec.of(loops, n_loops), self.cfg, cached=cache is not None,
            depth_slots=None if cache is None else cache.depth_slots,
            shares_depths=cache is not None and cache.shares_depths, traced=points is not None)
        if host_checks:
            spec.check_traced_counts()
        cfg = self.cfg
        B, T = input_ids.shape
        key = self._dropout_key() if cache is None else None
        keys = split_key(key, cfg.prelude_layers + cfg.coda_layers + 1)
        prelude_keys, loop_key, coda_keys = (keys[:cfg.prelude_layers], keys[cfg.prelude_layers],
                                             keys[cfg.prelude_layers + 1:])
        if cache is None:
            index, prelude_in, recurrent_in, coda_in = None, None, None, None
            span = (KeySpan.causal(B) if start is None
                    else KeySpan(jnp.asarray(start, jnp.int32), jnp.int32(0)))
        else:
            span, index = cache.span(), cache.write_slot()
            prelude_in, recurrent_in, coda_in = cache.prelude, cache.recurrent, cache.coda
        positions = (jnp.arange(T) if cache is None and start is None else jnp.maximum(
            jnp.reshape(span.q_offset, (-1, 1)) + jnp.arange(T) - span.kv_start[:, None], 0))
        real = (None if cache is None and start is None and lengths is None
                else span.real_rows(T, lengths))
        rope, loop_rope = _rope_tables(cfg, positions)

        prelude_out, coda_out = ([], []) if points is not None else (None, None)
        embedded = self._embed(input_ids)
        x, prelude_caches = _apply_layers(self.prelude, embedded, rope, span, prelude_keys,
                                          prelude_in, index, prelude_out)
        if self.prelude_norm is not None:
            x = self.prelude_norm(x)

        def decode(h):       # next-token log-probs of a loop output ("kl" exit rules)
            coda_out, _ = self._coda(h, rope, span, coda_keys, coda_in, index)
            return jax.nn.log_softmax(self._head(coda_out))

        loop = loops_lib.run_loops(self.recurrent, x,
                                   loops_lib.LoopContext(loop_rope, span, loop_key, real), spec,
                                   decode, recurrent_in, index, points)
        recurrent_out = self.recurrent.output(loop.state)
        x, coda_caches = self._coda(recurrent_out, rope, span, coda_keys, coda_in, index,
                                    coda_out)
        logits = self._head(_last_tokens(x, lengths) if last_only else x)
        if points is not None:
            return Trajectory(logits, points.take(embedded),
                              tuple(points.take(y) for y in prelude_out), loop.trace,
                              points.take(recurrent_out), tuple(points.take(y) for y in coda_out))
        if cache is None and not return_info:
            return logits
        info = None
        if return_info:
            state = loop.state
            info = loops_lib.LoopInfo(loop.loops_run,
                                      self.recurrent.ponder_cost(state, loop.loops_run),
                                      state.moe.totals(),
                                      jnp.sqrt(jnp.mean(jnp.square(state.h), axis=(1, 2))))
        if cache is not None:
            advance = T if lengths is None else jnp.asarray(lengths, jnp.int32)
            cache = cache.replace(prelude=tuple(prelude_caches), recurrent=loop.cache,
                                  coda=tuple(coda_caches), index=cache.index + advance,
                                  empty=False)
        return Forward(logits, info, cache)

    def _coda(self, x, rope, span, coda_keys, caches, index, outputs=None):
        """Read-out and coda layers: (B, T, D) -> (B, T, D) and the coda caches."""
        if self.readout is not None:
            x = self.readout(x)
        return _apply_layers(self.coda, x, rope, span, coda_keys, caches, index, outputs)

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

    def _check_inputs(self, input_ids, cache, start, lengths, host_checks: bool) -> None:
        """The boundary checks of ``__call__`` (see there)."""
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
        if cache is not None and start is not None:
            raise ValueError("start is for a forward without cache; a cache holds its own "
                             "(init_cache(..., start=...))")
        _check_per_sequence("start", start, shape[0], 0, shape[1] - 1)
        _check_per_sequence("lengths", lengths, shape[0], 0, shape[1])
        host_values = [(input_ids, lambda ids: raise_if_out_of_vocab(
            np.min(ids), np.max(ids), self.cfg.vocab_size))]
        if cache is not None:
            host_values.append((cache.index, lambda index: raise_if_cache_full(
                np.max(index), shape[1], cache.max_len)))
        for value, check in host_values:
            if not isinstance(value, jax.core.Tracer):
                check(np.asarray(value))
            elif host_checks:
                jax.debug.callback(check, value)


def _check_per_sequence(name: str, values, batch: int, lowest: int, highest: int) -> None:
    """``start`` / ``lengths``: None or (batch,) integers in [lowest, highest] (range checked
    when concrete); ``ValueError`` naming the argument."""
    if values is None:
        return
    shape = getattr(values, "shape", None)
    if shape != (batch,) or not jnp.issubdtype(values.dtype, jnp.integer):
        raise ValueError(f"{name} must be a ({batch},) integer array, one per sequence, got "
                         f"{getattr(values, 'dtype', type(values).__name__)} {shape}")
    if not isinstance(values, jax.core.Tracer):
        values = np.asarray(values)
        if values.min() < lowest or values.max() > highest:
            raise ValueError(f"{name} must be in [{lowest}, {highest}], got {values.tolist()}")


def _last_tokens(x: jax.Array, lengths) -> jax.Array:
    """(B, T, D) -> (B, 1, D): each row's last real token (``lengths`` (B,), default T)."""
    if lengths is None:
        return x[:, -1:]
    last = jnp.maximum(jnp.asarray(lengths, jnp.int32) - 1, 0)
    return jnp.take_along_axis(x, last[:, None, None], axis=1)


def _rope_tables(cfg: MythosConfig, positions: jax.Array):
    """positions (T,) or (B, T) -> RoPE cos/sin (T | B, T, rope_dim/2) for the prelude and
    coda, and for the loop; identity tables (cos 1, sin 0: no rotation) where
    ``cfg.positions`` removes positions."""
    rope = rope_cos_sin(positions, cfg.rope_dim, cfg.rope_theta)
    if cfg.positions == Positions.ROPE:
        return rope, rope
    identity = (jnp.ones_like(rope[0]), jnp.zeros_like(rope[1]))
    return (identity if cfg.positions == Positions.NOPE else rope), identity


def _apply_layers(layers, x, rope, span, keys, caches, index, outputs=None):
    """A stack of transformer blocks: (B, T, D) -> (B, T, D) and their updated caches;
    ``outputs`` (a list) also gets each layer's output (a traced forward)."""
    new_caches = []
    caches = [None] * len(layers) if caches is None else caches
    for layer, key, layer_cache in zip(layers, keys, caches, strict=True):
        x, layer_cache, _ = layer(x, rope, span, key, layer_cache, index)
        new_caches.append(layer_cache)
        if outputs is not None:
            outputs.append(x)
    return x, new_caches


def _trace_points(trace, seq_len: int, cache, return_info: bool):
    """``__call__``'s ``trace`` as TracePoints, or None when off (ValueError naming it)."""
    if trace is False or trace is None:
        return None
    if cache is not None or return_info:
        raise ValueError("trace returns a Trajectory of a whole forward; it cannot be "
                         "combined with a cache or return_info")
    if trace is True:
        return loops_lib.TracePoints()
    positions = tuple(trace) if isinstance(trace, (tuple, list)) else None
    if not positions or not all(isinstance(p, int) and not isinstance(p, bool)
                                and -seq_len <= p < seq_len for p in positions):
        raise ValueError(f"trace must be True, False or a non-empty tuple of positions in "
                         f"[-{seq_len}, {seq_len}), got {trace!r}")
    return loops_lib.TracePoints(positions)


def raise_if_cache_full(index, new_tokens: int, max_len: int) -> None:
    if int(index) + new_tokens > max_len:
        raise ValueError(f"the cache holds {int(index)} of its {max_len} slots: {new_tokens} "
                         f"more tokens do not fit (init_cache(..., max_len) or generate's "
                         f"max_len)")


def _parcae_readout_init(dim: int):
    """Parcae's read-out C: truncated normal (+-3 std), std sqrt(2 / (5 dim))."""
    return nnx.initializers.truncated_normal(stddev=(2.0 / (5.0 * dim)) ** 0.5, lower=-3.0,
                                             upper=3.0)


def raise_if_out_of_vocab(lowest, highest, vocab_size: int) -> None:
    if lowest < 0 or highest >= vocab_size:
        raise ValueError(f"input_ids contain token id(s) outside [0, vocab_size={vocab_size}): "
                         f"min {int(lowest)}, max {int(highest)}")
