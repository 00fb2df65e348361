"""Parameter counts of each sub-model from abstract shapes (`jax.eval_shape`): nothing is allocated."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from b2t_jax.models import create_model


def abstract_params(config: ml_collections.ConfigDict):
  """The model's params as ShapeDtypeStructs, still boxed with their logical axis names."""
  model = create_model(config)
  f = config.data.n_features // config.data.feature_pool
  x = jax.ShapeDtypeStruct((1, min(config.data.time_buckets), f), jnp.float32)
  day = jax.ShapeDtypeStruct((1,), jnp.int32)
  return jax.eval_shape(lambda x, d: model.init(jax.random.PRNGKey(0), x, d), x, day)["params"]


def parameter_counts(config: ml_collections.ConfigDict) -> dict[str, int]:
  """{sub-model: count, ..., 'total': count} of the configured model."""
  counts = {k: sum(int(np.prod(l.shape)) for l in jax.tree.leaves(v))
            for k, v in abstract_params(config).items()}
  counts["total"] = sum(counts.values())
  return counts
