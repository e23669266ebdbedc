"""Benchmarking: shared timing (``timing``), model presets (``presets``) and the comparison
with the PyTorch reference (``torch_compare``); ``experiments/bench_*.py`` import them."""
