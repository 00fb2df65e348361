"""b2t_jax: a JAX/Flax brain-to-text decoder (GRU/CTC) from a laptop CPU to a TPU pod."""

__version__ = "0.1.0"
