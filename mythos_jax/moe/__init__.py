"""The Mixture-of-Experts FFN of the recurrent block, one concept per module (import from them):

  layer            ``MoE``: the nnx.Module (router + routed experts + shared experts)
  router           top-K routing, ``RouterBias`` and ``update_router_biases`` (balancing)
  stats            ``RouterStats`` per call, ``MoEStats`` per forward pass, ``load_ratio``
  dispatch         the strategies, ``STRATEGIES`` keyed by ``modes.MoEImpl``, ``dispatch``
  expert_parallel  the exchange when experts are sharded over the mesh's ``expert`` axis
  expert_ffn       SwiGLU experts over rows sorted by expert, in blocks or in buffers
  slots            rows sorted by expert, capacity slots, combining outputs per token
Dependencies: layer -> dispatch -> expert_parallel -> expert_ffn, slots.
"""
