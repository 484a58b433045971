"""vljax: vision-language models in JAX/Flax, sharded from day one."""

__version__ = "0.1.0"
