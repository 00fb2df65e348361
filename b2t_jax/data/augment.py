"""On-device training augmentations and Gaussian smoothing (SPEC §4), static shapes, driven by a PRNG key."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


def gaussian_kernel(std: float, size: int, threshold: float) -> np.ndarray:
  """Taps of a Gaussian sampled on a `size`-long grid (as a filtered delta, truncated at 4 sigma), kept where
  > threshold and renormalised. sigma=2, size=100, threshold=0.01 gives the reference's 9 taps."""
  radius = int(4.0 * std + 0.5)
  k = np.arange(-radius, radius + 1, dtype=np.float64)
  g = np.exp(-0.5 * (k / std) ** 2)
  g /= g.sum()
  full = np.zeros(size)
  centre = size // 2
  lo, hi = max(centre - radius, 0), min(centre + radius + 1, size)
  full[lo:hi] = g[lo - (centre - radius) : hi - (centre - radius)]
  kept = full[full > threshold]
  return (kept / kept.sum()).astype(np.float32)


def smooth(x: jax.Array, taps: np.ndarray) -> jax.Array:
  """Depthwise 'same' convolution over time (axis 1) with zero padding; `taps` must have odd length."""
  n = len(taps)
  if n % 2 != 1:
    raise ValueError(f"smoothing kernel must have odd length, got {n}")
  half = n // 2
  t = x.shape[1]
  xp = jnp.pad(x, ((0, 0), (half, half), (0, 0)))
  # Correlation with flipped taps == convolution; the kernel is symmetric so either reads the same.
  return sum(float(w) * xp[:, k : k + t] for k, w in enumerate(taps[::-1]))


def time_mask(lengths: jax.Array, t: int) -> jax.Array:
  """(B, T, 1) float mask, 1 where the bin index is < the trial's length."""
  return (jnp.arange(t)[None, :] < lengths[:, None]).astype(jnp.float32)[..., None]


def draw(key: jax.Array, shape: tuple[int, int, int], cfg: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """The random draws of one step's augmentation, one independent stream per transform (only the enabled
  ones): standard normals `gain` (B, F, F), `white` (B, T, F), `offset` (B, 1, F), `walk` (B, T, F), and
  the cut `c` ~ U{0..random_cut-1}."""
  b, t, f = shape
  k_gain, k_white, k_off, k_walk, k_cut = jax.random.split(key, 5)
  out = {}
  if cfg.static_gain_std > 0:
    out["gain"] = jax.random.normal(k_gain, (b, f, f))
  if cfg.white_noise_std > 0:
    out["white"] = jax.random.normal(k_white, (b, t, f))
  if cfg.constant_offset_std > 0:
    out["offset"] = jax.random.normal(k_off, (b, 1, f))
  if cfg.random_walk_std > 0:
    out["walk"] = jax.random.normal(k_walk, (b, t, f))
  if cfg.random_cut > 1:
    out["cut"] = jax.random.randint(k_cut, (), 0, cfg.random_cut)
  return out


def apply(x: jax.Array, lengths: jax.Array, draws: dict[str, jax.Array], cfg: ml_collections.ConfigDict):
  """The SPEC §4 transforms, in the reference's order, given their draws (see `draw`). Returns (x, lengths);
  padding bins are zeroed so that smoothing sees the same zeros as eval."""
  t, f = x.shape[1], x.shape[2]
  if "gain" in draws:  # x @ (I + std * N), one matrix per trial
    x = jnp.einsum("btf,bfg->btg", x, jnp.eye(f) + cfg.static_gain_std * draws["gain"])
  if "white" in draws:
    x = x + cfg.white_noise_std * draws["white"]
  if "offset" in draws:
    x = x + cfg.constant_offset_std * draws["offset"]
  if "walk" in draws:  # cumulative sum over time of i.i.d. steps
    x = x + jnp.cumsum(cfg.random_walk_std * draws["walk"], axis=1)
  if "cut" in draws:
    # Drop the first c bins by shifting left (static shape) and shortening every trial by c.
    c = draws["cut"]
    x = jnp.roll(x, -c, axis=1)
    lengths = jnp.maximum(lengths - c, 0)
  return x * time_mask(lengths, t), lengths


def augment(key: jax.Array, x: jax.Array, lengths: jax.Array, cfg: ml_collections.ConfigDict):
  """Train-only transforms in the reference's order: static gain, white noise, constant offset, random walk,
  random cut. Returns (x, lengths)."""
  return apply(x, lengths, draw(key, x.shape, cfg), cfg)


def preprocess(key: jax.Array | None, x: jax.Array, lengths: jax.Array, cfg: ml_collections.ConfigDict):
  """Augment (when `key` is given, i.e. training) then smooth; the eval path passes key=None."""
  x = x.astype(jnp.float32)
  if key is not None:
    x, lengths = augment(key, x, lengths, cfg)
  if cfg.smooth_kernel_std > 0:
    x = smooth(x, gaussian_kernel(cfg.smooth_kernel_std, cfg.smooth_kernel_size, cfg.smooth_threshold))
  return x, lengths
