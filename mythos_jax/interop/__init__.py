"""Converters between mythos-jax and other implementations (torch imported lazily)."""
