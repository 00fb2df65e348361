"""Front end shared by the decoders: per-day input layers, softsign, dropout and patching (SPEC §3.1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from b2t_jax.models.cell import matmul
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
  frames = [x[:, k : k + span : patch_stride, :] for k in range(patch_size)]
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

  def setup(self):
    # Axis 0 is the day: the optimizer's day-layer schedule and the PyTorch import index it.
    self.day_weights = self.param(
      "day_weights",
      nn.with_logical_partitioning(_identity_stack, ("days", "features", "features_out")),
      (self.n_days, self.n_features, self.n_features),
    )
    self.day_biases = self.param(
      "day_biases",
      nn.with_logical_partitioning(nn.initializers.zeros, ("days", "features_out")),
      (self.n_days, self.n_features),
    )
    # A one-element list names the module `Dropout_0` (its PRNG stream folds in the name), as it always was.
    self.Dropout = [nn.Dropout(self.dropout_rate)]
    self.proj = None
    if self.patch_features:
      self.proj = nn.Dense(
        self.patch_features,
        dtype=self.dtype,
        kernel_init=nn.with_logical_partitioning(nn.linear.default_kernel_init, ("features_out", "patch_features")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("patch_features",)),
      )

  def frames(self, x: jax.Array, day: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """(B, T, n_features) bins and (B,) day indices -> the frames that patches are cut from (B, T, F') in
    `dtype`, F' = patch_features or n_features. Streaming calls it on a chunk of bins at a time."""
    if x.shape[-1] != self.n_features:
      raise ValueError(
        f"input has {x.shape[-1]} features per bin, the model expects {self.n_features} "
        "(config.model.n_input_features / config.data.feature_pool)"
      )
    # One batched matmul over the gathered per-trial matrices; the gather's transpose leaves absent days at 0.
    y = matmul("btf,bfg->btg", x, jnp.take(self.day_weights, day, axis=0), self.dtype)
    y = nn.soft_sign(y + jnp.take(self.day_biases, day, axis=0)[:, None, :])
    y = self.Dropout[0](y, deterministic=deterministic)
    if self.proj is not None:
      y = self.proj(y)
    return y.astype(self.dtype)

  def __call__(self, x: jax.Array, day: jax.Array, *, deterministic: bool) -> jax.Array:
    """(B, T, n_features), (B,) -> patches (B, P, patch_size * F')."""
    return patchify(self.frames(x, day, deterministic=deterministic), self.patch_size, self.patch_stride)
