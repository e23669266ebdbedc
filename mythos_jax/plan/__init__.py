"""Ahead-of-time fit check of the trainer's own step against TPU slices (``mythos-jax plan``):
``topology`` (slices and compile-only devices), ``memory`` (per-device bytes, compiled or
estimated), ``report`` (the table)."""
