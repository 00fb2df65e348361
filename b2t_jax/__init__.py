"""b2t_jax: a JAX/Flax brain-to-text decoder (GRU/CTC) from a laptop CPU to a TPU pod."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # clu's writers import TensorFlow; keep its banner quiet

__version__ = "0.1.0"
