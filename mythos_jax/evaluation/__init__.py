"""Benchmarks through EleutherAI's lm-evaluation-harness: ``scoring`` (batched, bucketed
log-likelihoods of token windows), ``lm_eval_model`` (the registered ``mythos-jax`` model;
importing it imports lm-eval) and ``report`` (the task x depth table and plot). Nothing here
is imported by ``mythos_jax`` itself, so the package needs no lm-eval."""
