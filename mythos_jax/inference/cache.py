"""Preallocated KV caches: a fixed number of slots per attention layer and loop depth.

Each sequence has its own write slot ``index`` (B,): the slots before it are written, the next
forward writes its T new tokens at ``index .. index + T - 1`` and advances it by the tokens
that are real (``lengths``, default T). ``start`` (B,) marks each sequence's first real slot
(its position 0): a first prefill left-pads its prompts, later calls (chunked prefill, the
next turn of a conversation) right-pad theirs, so sequences keep their own lengths. A cache
fresh from :func:`init_cache` is ``empty`` (static): its first forward attends over its own
tokens only (the flash kernels' prefill); every later one over the cache. Layer caches:
  MLA  {"c_kv": (B, S, kv_lora), "k_rope": (B, S, rope)}   the normalised latent and ONE
       shared rotated RoPE key per token: kv_lora + rope values per token per layer-depth;
  GQA  {"k": (B, S, KV, hd), "v": (B, S, KV, hd)}          post-RoPE keys and values.
The recurrent block has one cache per loop depth, stacked on a leading axis (depths, ...);
with ``shares_depths`` it holds fewer depth slots than loops and depth t uses slot
``t mod slots`` (Huginn's KV sharing). Caches are pytrees of arrays (``shares_depths`` is
static): they jit, donate and shard like activations.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mythos_jax.config import MythosConfig
from mythos_jax.kernels.masks import KeySpan
from mythos_jax.modes import AttentionType


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    prelude: tuple[dict[str, jax.Array], ...]
    recurrent: dict[str, jax.Array]          # leading axis: loop depth
    coda: tuple[dict[str, jax.Array], ...]
    index: jax.Array                          # int32 (B,): slots written so far per sequence
    start: jax.Array                          # int32 (B,): first real slot of each sequence
    shares_depths: bool = dataclasses.field(default=False, metadata={"static": True})
    empty: bool = dataclasses.field(default=True, metadata={"static": True})

    @property
    def max_len(self) -> int:
        return next(iter(self.recurrent.values())).shape[2]

    @property
    def depth_slots(self) -> int:
        """Depth slots of the recurrent cache (as many as the loops, unless shared)."""
        return next(iter(self.recurrent.values())).shape[0]

    def span(self) -> KeySpan:
        """The attention span of the next call: from each sequence's first real slot, the
        queries at slots ``index ..``."""
        return KeySpan(self.start, self.index)

    def write_slot(self):
        """The ``index`` the layers take: None while the cache is ``empty`` (the forward
        writes slots 0.. and attends over its own tokens), else ``index`` (B,)."""
        return None if self.empty else self.index

    def replace(self, **changes) -> "KVCache":
        return dataclasses.replace(self, **changes)


def layer_cache_shapes(cfg: MythosConfig, batch: int, max_len: int) -> dict[str, tuple]:
    if cfg.attn_type == AttentionType.MLA:
        return {"c_kv": (batch, max_len, cfg.kv_lora_rank),
                "k_rope": (batch, max_len, cfg.qk_rope_head_dim)}
    kv = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    return {"k": kv, "v": kv}


def init_cache(cfg: MythosConfig, batch: int, max_len: int, depth_slots: int,
               start: jax.Array | None = None, dtype=jnp.float32,
               shares_depths: bool = False) -> KVCache:
    """Zeroed caches for ``batch`` sequences of up to ``max_len`` tokens, ``depth_slots``
    recurrent depths: the loop count of the forwards that use it, or fewer with
    ``shares_depths`` (depth t uses slot t mod depth_slots)."""
    if max_len > cfg.max_seq_len:
        raise ValueError(f"cache length {max_len} > max_seq_len {cfg.max_seq_len} "
                         "(MythosConfig.max_seq_len)")
    shapes = layer_cache_shapes(cfg, batch, max_len)

    def layer(depth=()):
        return {name: jnp.zeros(depth + shape, dtype) for name, shape in shapes.items()}

    start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
    return KVCache(tuple(layer() for _ in range(cfg.prelude_layers)), layer((depth_slots,)),
                   tuple(layer() for _ in range(cfg.coda_layers)),
                   jnp.zeros((batch,), jnp.int32), start, shares_depths)


def row_slots(array: jax.Array, index, length: int, axis: int) -> tuple:
    """The advanced index of ``length`` slots from each sequence's ``index`` (B,): the batch
    on axis ``axis - 1`` of ``array``, the slots on ``axis`` (a scatter / gather: XLA updates
    it in place inside loops, where a vmapped dynamic slice copies the array)."""
    batch = jnp.arange(array.shape[axis - 1])[:, None]
    return (slice(None),) * (axis - 1) + (batch, index[:, None] + jnp.arange(length))


def slice_rows(array: jax.Array, index, length: int, axis: int) -> jax.Array:
    """``length`` slots of each sequence from its own slot ``index`` (B,) (None: slot 0):
    ``array`` has the batch on axis ``axis - 1`` and the slots on ``axis``."""
    if index is None:
        return jax.lax.slice_in_dim(array, 0, length, axis=axis)
    return array[row_slots(array, index, length, axis)]


def update_rows(array: jax.Array, rows: jax.Array, index, axis: int) -> jax.Array:
    """``array`` with ``rows`` written at each sequence's slot ``index`` (B,) (None: slot 0);
    batch on axis ``axis - 1``, slots on ``axis`` of both."""
    rows = rows.astype(array.dtype)
    if index is None:
        return jax.lax.dynamic_update_slice_in_dim(array, rows, 0, axis=axis)
    return array.at[row_slots(array, index, rows.shape[axis], axis)].set(rows)


def cache_values_per_token(cfg: MythosConfig, depth_slots: int) -> int:
    """Cached numbers per token over all layers and depth slots (analytic)."""
    per_layer = (cfg.kv_lora_rank + cfg.qk_rope_head_dim if cfg.attn_type == AttentionType.MLA
                 else 2 * cfg.n_kv_heads * cfg.head_dim)
    return per_layer * (cfg.prelude_layers + depth_slots + cfg.coda_layers)


def openmythos_cache_values_per_token(cfg: MythosConfig, n_loops: int) -> int:
    """The same for OpenMythos's cache, which keeps k_rope once per head (MLA)."""
    per_layer = (cfg.kv_lora_rank + cfg.n_heads * cfg.qk_rope_head_dim
                 if cfg.attn_type == AttentionType.MLA else 2 * cfg.n_kv_heads * cfg.head_dim)
    return per_layer * (cfg.prelude_layers + n_loops + cfg.coda_layers)
