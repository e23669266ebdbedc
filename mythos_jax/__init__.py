"""mythos-jax: the OpenMythos Recurrent-Depth Transformer in JAX / Flax NNX."""

from mythos_jax import loops, schedules, variants
from mythos_jax.config import MythosConfig
from mythos_jax.flop_count import flops
from mythos_jax.inference.cache import init_cache
from mythos_jax.inference.generate import generate
from mythos_jax.loops import LoopSpec
from mythos_jax.model import OpenMythos

__all__ = ["LoopSpec", "MythosConfig", "OpenMythos", "flops", "generate", "init_cache", "loops",
           "schedules", "variants"]
__version__ = "0.1.0"
