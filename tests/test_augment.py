"""Augmentation and smoothing against NumPy definitions of SPEC §4."""

import jax
import jax.numpy as jnp
import numpy as np

from b2t_jax.data.augment import augment, gaussian_kernel, preprocess, smooth
from configs import default

SPEC_TAPS = [.0276, .0663, .1238, .1802, .2042, .1802, .1238, .0663, .0276]


def test_kernel_is_the_published_nine_taps():
  taps = gaussian_kernel(2.0, 100, 0.01)
  np.testing.assert_allclose(taps, SPEC_TAPS, atol=5e-5)
  assert abs(taps.sum() - 1) < 1e-6


def test_smoothing_is_zero_padded_same_convolution():
  x = np.random.default_rng(0).standard_normal((2, 30, 3)).astype(np.float32)
  taps = gaussian_kernel(2.0, 100, 0.01)
  got = np.asarray(smooth(jnp.asarray(x), taps))
  want = np.stack([np.stack([np.convolve(x[b, :, c], taps, mode="same") for c in range(3)], -1) for b in range(2)])
  np.testing.assert_allclose(got, want, atol=1e-6)


def _cfg(**kw):
  c = default.get_config().aug
  for k in ("static_gain_std", "white_noise_std", "constant_offset_std", "random_walk_std"):
    c[k] = 0.0
  c.random_cut = 0
  c.update(kw)
  return c


def test_random_cut_shifts_and_shortens():
  x = jnp.tile(jnp.arange(10.0)[None, :, None], (2, 1, 2))
  lengths = jnp.array([10, 6])
  cuts = set()
  for seed in range(12):
    y, new = augment(jax.random.PRNGKey(seed), x, lengths, _cfg(random_cut=3))
    c = int(lengths[0] - new[0])
    cuts.add(c)
    assert int(lengths[1] - new[1]) == c                       # one c per batch
    np.testing.assert_array_equal(np.asarray(y[0, :10 - c, 0]), np.arange(c, 10.0))
    assert not np.asarray(y[1, 6 - c:]).any()                  # padding stays zero
  assert cuts == {0, 1, 2}


def test_noise_offset_and_walk_statistics():
  x = jnp.zeros((64, 200, 4))
  lengths = jnp.full((64,), 200)
  y, _ = augment(jax.random.PRNGKey(0), x, lengths, _cfg(white_noise_std=1.0))
  assert abs(float(y.std()) - 1.0) < 0.02
  y, _ = augment(jax.random.PRNGKey(0), x, lengths, _cfg(constant_offset_std=0.2))
  np.testing.assert_allclose(np.asarray(y[:, 0]), np.asarray(y[:, -1]))   # constant over time
  assert abs(float(y[:, 0].std()) - 0.2) < 0.03
  y, _ = augment(jax.random.PRNGKey(0), x, lengths, _cfg(random_walk_std=0.1))
  steps = np.diff(np.asarray(y), axis=1)
  assert abs(steps.std() - 0.1) < 0.005                        # increments are the i.i.d. steps
  y, _ = augment(jax.random.PRNGKey(0), jnp.ones((2, 5, 4)), jnp.full((2,), 5), _cfg(static_gain_std=0.5))
  assert float(jnp.abs(y - 1).max()) > 0.1                     # a per-trial channel mixing was applied


def test_eval_path_only_smooths():
  x = np.random.default_rng(1).standard_normal((1, 40, 2)).astype(np.float32)
  y, lengths = preprocess(None, jnp.asarray(x), jnp.array([40]), default.get_config().aug)
  want = np.stack([np.convolve(x[0, :, c], SPEC_TAPS, mode="same") for c in range(2)], -1)
  np.testing.assert_allclose(np.asarray(y[0]), want, atol=1e-3)  # SPEC_TAPS are rounded to 4 decimals
  assert int(lengths[0]) == 40
