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


# Streams of the time-domain transforms (not in SPEC): folded into the step's augmentation key, so the SPEC
# transforms keep the draws of `draw`'s five-way split (every earlier run's numbers are unchanged).
_JITTER_STREAM, _MASK_STREAM = 5, 6


def time_jitter(key: jax.Array, x: jax.Array, lengths: jax.Array, shift_bins: int, stretch: float):
  """A random shift k ~ U{-shift_bins..shift_bins} and stretch f ~ U[1 - stretch, 1 + stretch] per trial (0 = off).

  Output bin t reads input position u = (t - k) / f by linear interpolation: a delay (k > 0) puts k zero bins
  before the trial, an advance drops its first -k / f bins, a stretch f > 1 slows it down. The new length is
  the last output bin whose u lies in the trial, + 1 (at most the padded length T; 0 if nothing is left);
  later bins are zero. Static shapes: one gather per trial. Returns (x, lengths)."""
  b, t, _ = x.shape
  k_shift, k_stretch = jax.random.split(key)
  shift = jax.random.randint(k_shift, (b,), -shift_bins, shift_bins + 1).astype(jnp.float32)
  factor = 1.0 + stretch * jax.random.uniform(k_stretch, (b,), minval=-1.0, maxval=1.0)
  last = lengths.astype(jnp.float32) - 1.0  # the trial's last input position
  new_len = jnp.clip(jnp.floor(shift + factor * last) + 1.0, 0, t).astype(lengths.dtype)
  u = (jnp.arange(t, dtype=jnp.float32)[None, :] - shift[:, None]) / factor[:, None]  # (B, T)
  inside = (u >= 0.0) & (jnp.arange(t)[None, :] < new_len[:, None])
  lo = jnp.clip(jnp.floor(u), 0, t - 1).astype(jnp.int32)
  hi = jnp.clip(lo + 1, 0, t - 1)
  w = (u - jnp.floor(u))[..., None]
  take = lambda idx: jnp.take_along_axis(x, idx[..., None], axis=1)
  out = (1.0 - w) * take(lo) + w * take(hi)
  return jnp.where(inside[..., None], out, 0.0), new_len


def mask_start_probability(fraction: float, max_bins: int) -> float:
  """The per-bin probability p of a mask starting there such that a bin is masked with probability `fraction`,
  spans being U{1..max_bins} long: bin t escapes every span that could cover it with probability
  prod_{d=0}^{max_bins-1} (1 - p (max_bins - d) / max_bins) (a start d bins earlier covers it if its span > d);
  solved for p by bisection (host side: a static number)."""
  covers = (max_bins - np.arange(max_bins)) / max_bins
  lo, hi = 0.0, 1.0
  for _ in range(60):
    p = 0.5 * (lo + hi)
    lo, hi = (p, hi) if 1.0 - np.prod(1.0 - p * covers) < fraction else (lo, p)
  return 0.5 * (lo + hi)


def time_mask_spans(key: jax.Array, shape: tuple[int, int], fraction: float, max_bins: int) -> jax.Array:
  """(B, T) bool, True on masked bins: spans of U{1..max_bins} bins start at each bin independently with the
  probability that masks `fraction` of the bins in expectation (`mask_start_probability`)."""
  k_start, k_span = jax.random.split(key)
  starts = jax.random.bernoulli(k_start, mask_start_probability(fraction, max_bins), shape)
  spans = jax.random.randint(k_span, shape, 1, max_bins + 1)
  # A bin is masked when a span that starts at or before it ends after it: the running max of span ends.
  ends = jnp.where(starts, jnp.arange(shape[1])[None, :] + spans, 0)
  return jax.lax.cummax(ends, axis=1) > jnp.arange(shape[1])[None, :]


def preprocess(key: jax.Array | None, x: jax.Array, lengths: jax.Array, cfg: ml_collections.ConfigDict):
  """Training (`key` given): time jitter (opt-in), the SPEC augmentations, smoothing, time masking (opt-in).
  Eval (key=None): smoothing only. Returns (x, lengths)."""
  x = x.astype(jnp.float32)
  if key is not None and (cfg.time_jitter_shift_bins > 0 or cfg.time_jitter_stretch > 0):
    x, lengths = time_jitter(
      jax.random.fold_in(key, _JITTER_STREAM), x, lengths, cfg.time_jitter_shift_bins, cfg.time_jitter_stretch
    )
  if key is not None:
    x, lengths = augment(key, x, lengths, cfg)
  if cfg.smooth_kernel_std > 0:
    x = smooth(x, gaussian_kernel(cfg.smooth_kernel_std, cfg.smooth_kernel_size, cfg.smooth_threshold))
  if key is not None and cfg.time_mask_fraction > 0:
    masked = time_mask_spans(
      jax.random.fold_in(key, _MASK_STREAM), x.shape[:2], cfg.time_mask_fraction, cfg.time_mask_max_bins
    )
    x = jnp.where(masked[..., None], 0.0, x)
  return x, lengths
