"""Training: data pipelines (Grain), optimisation (Optax), checkpoints (Orbax), the train loop."""
