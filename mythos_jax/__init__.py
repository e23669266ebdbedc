"""mythos-jax: the OpenMythos Recurrent-Depth Transformer in JAX / Flax NNX."""

from mythos_jax import loops, variants
from mythos_jax.config import MythosConfig
from mythos_jax.flop_count import flops
from mythos_jax.inference.generate import generate
from mythos_jax.model import OpenMythos

__all__ = ["MythosConfig", "OpenMythos", "flops", "generate", "loops", "variants"]
__version__ = "0.1.0"
