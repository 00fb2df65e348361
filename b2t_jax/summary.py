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
  counts = {k: sum(int(np.prod(l.shape)) for l in jax.tree.leaves(v)) for k, v in abstract_params(config).items()}
  counts["total"] = sum(counts.values())
  return counts


def _gru_flops(n_layers: int, d_in: int, hidden: int) -> int:
  """Matmul FLOPs of a GRU stack per time step and trial: input projection + recurrent projection."""
  flops = 0
  for i in range(n_layers):
    flops += 2 * (d_in if i == 0 else hidden) * 3 * hidden + 2 * hidden * 3 * hidden
  return flops


def forward_flops(config: ml_collections.ConfigDict, time_bins: int) -> int:
  """Matmul FLOPs of one trial's training forward pass ('full' mode for the triple model) over `time_bins`.

  Counts the day layers and the optional projection (per bin), the GRU input and recurrent projections and
  the output heads (per patch); elementwise work (gates, softsign, CTC) is left out, as MFU conventions do.
  """
  m = config.model
  f = config.data.n_features // config.data.feature_pool
  patches = (time_bins - m.patch_size) // m.patch_stride + 1
  patch_dim = (m.patch_features or f) * m.patch_size
  day = 2 * f * f * time_bins + 2 * f * m.patch_features * time_bins  # day layer (+ projection, when on)
  head = 2 * m.hidden * m.n_classes * patches
  if m.kind == "gru":
    return day + _gru_flops(m.n_layers, patch_dim, m.hidden) * patches + head
  noise = _gru_flops(m.noise_layers, patch_dim, patch_dim)
  clean = _gru_flops(m.clean_layers, patch_dim, m.hidden)
  noisy = _gru_flops(m.noisy_layers, patch_dim, m.hidden)
  return 2 * day + (noise + clean + noisy) * patches + 2 * head


def train_step_flops(config: ml_collections.ConfigDict, batch: int, time_bins: int) -> int:
  """Model FLOPs of one optimizer step: 3 x forward (the backward pass is two matmuls per forward matmul)."""
  return 3 * batch * forward_flops(config, time_bins)
