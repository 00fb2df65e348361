"""Front end shared by the decoders: per-day input layers, softsign, dropout and patching (SPEC §3.1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from b2t_jax.models.gru import matmul
from b2t_jax.patching import n_patches


def patchify(x: jax.Array, patch_size: int, patch_stride: int) -> jax.Array:
  """(B, T, D) -> (B, P, size * D) with patch p = concat_k frame[stride * p + k], flat index k * D + d.

  Built from `size` strided slices rather than a gather: the backward pass is then a sum of pads,
  which XLA fuses, instead of a scatter-add.
  """
  _, t, d = x.shape
  p = n_patches(t, patch_size, patch_stride)
  if p < 1:
    raise ValueError(f"padded length {t} is shorter than one patch ({patch_size} bins)")
  span = patch_stride * (p - 1) + 1
  frames = [x[:, k:k + span:patch_stride, :] for k in range(patch_size)]
  return jnp.stack(frames, axis=2).reshape(x.shape[0], p, patch_size * d)


def _identity_stack(key, shape, dtype=jnp.float32):
  del key
  n_days, d_in, d_out = shape
  return jnp.broadcast_to(jnp.eye(d_in, d_out, dtype=dtype), shape)


class DayFrontEnd(nn.Module):
  """`softsign(x @ W[day] + b[day])` with W, b gathered by each trial's day index, then dropout and patching.

  With `patch_features` > 0 (not in SPEC; config.model.patch_features) a learned Dense(n_features ->
  patch_features) sits between dropout and patching, so patches are patch_size * patch_features wide.
  """

  n_days: int
  n_features: int
  patch_size: int
  patch_stride: int
  dropout_rate: float
  patch_features: int = 0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, day: jax.Array, *, deterministic: bool) -> jax.Array:
    if x.shape[-1] != self.n_features:
      raise ValueError(f"input has {x.shape[-1]} features per bin, the model expects {self.n_features} "
                       "(config.model.n_input_features / config.data.feature_pool)")
    w = self.param("day_weights", _identity_stack, (self.n_days, self.n_features, self.n_features))
    b = self.param("day_biases", nn.initializers.zeros, (self.n_days, self.n_features))
    # One batched matmul over the gathered per-trial matrices; the gather's transpose leaves absent days at 0.
    y = matmul("btf,bfg->btg", x, jnp.take(w, day, axis=0), self.dtype)
    y = nn.soft_sign(y + jnp.take(b, day, axis=0)[:, None, :])
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    if self.patch_features:
      y = nn.Dense(self.patch_features, dtype=self.dtype, name="proj")(y)
    return patchify(y.astype(self.dtype), self.patch_size, self.patch_stride)
