"""Parameter counts of each sub-model from abstract shapes (`jax.eval_shape`): nothing is allocated."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from b2t_jax import diphones
from b2t_jax.models import create_model, encoders
from b2t_jax.models.decoders import model_hparams


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


def forward_flops(config: ml_collections.ConfigDict, time_bins: int) -> int:
  """Matmul FLOPs of one trial's training forward pass ('full' mode for the triple model) over `time_bins`.

  Counts the day layers and the optional projection (per bin), each encoder stack's own count
  (`encoders.stack_flops`: a GRU's input and recurrent projections, a transformer's projections and attention, a
  Mamba-2 stack's projections, conv and SSD matmuls), the intermediate CTC heads and the output heads (per patch:
  the speech head's `model.targets` classes, the auxiliary phoneme head of 'both', a factored diphone head's
  phoneme logits, the triple's phoneme-level noisy head); elementwise work (gates, softsign, norms, the diphone
  marginalisation, CTC) is left out, as MFU
  conventions do.
  """
  m = config.model
  hp = model_hparams(config)
  f = hp.n_input_features
  patches = (time_bins - m.patch_size) // m.patch_stride + 1
  patch_dim = (m.patch_features or f) * m.patch_size
  day = 2 * f * f * time_bins + 2 * f * m.patch_features * time_bins  # day layer (+ projection, when on)

  def stack(n_layers: int, width: int, d_in: int = patch_dim, keep_width: bool = False) -> int:
    return encoders.stack_flops(hp, n_layers, d_in, width, patches, keep_width=keep_width)

  width = encoders.output_width(hp, m.hidden, keep_width=False)  # what the heads read
  phoneme_head = 2 * width * m.n_classes * patches
  speech_head = 2 * width * diphones.head_classes(m.targets, m.n_classes) * patches
  speech_head += phoneme_head if m.targets == "both" else 0
  speech_head += phoneme_head if diphones.is_factored(m.targets, hp.diphone_head) else 0
  ictc = len(hp.intermediate_ctc) * 2 * (2 * encoders.stream_width(hp, m.hidden) * m.n_classes) * patches
  if m.kind == "gru":
    return day + stack(m.n_layers, m.hidden) + ictc + speech_head
  noise = stack(m.noise_layers, patch_dim, keep_width=True)
  clean = stack(m.clean_layers, m.hidden)
  noisy = stack(m.noisy_layers, m.hidden)
  return 2 * day + noise + clean + noisy + ictc + speech_head + phoneme_head


def train_step_flops(config: ml_collections.ConfigDict, batch: int, time_bins: int) -> int:
  """Model FLOPs of one optimizer step: 3 x forward (the backward pass is two matmuls per forward matmul)."""
  return 3 * batch * forward_flops(config, time_bins)
