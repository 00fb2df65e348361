"""Augmentation and smoothing against NumPy definitions of SPEC §4."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from b2t_jax.data.augment import apply, augment, draw, gaussian_kernel, preprocess, smooth
from configs import default

SPEC_TAPS = [0.0276, 0.0663, 0.1238, 0.1802, 0.2042, 0.1802, 0.1238, 0.0663, 0.0276]


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
    assert int(lengths[1] - new[1]) == c  # one c per batch
    np.testing.assert_array_equal(np.asarray(y[0, : 10 - c, 0]), np.arange(c, 10.0))
    assert not np.asarray(y[1, 6 - c :]).any()  # padding stays zero
  assert cuts == {0, 1, 2}


def test_noise_offset_and_walk_statistics():
  x = jnp.zeros((64, 200, 4))
  lengths = jnp.full((64,), 200)
  y, _ = augment(jax.random.PRNGKey(0), x, lengths, _cfg(white_noise_std=1.0))
  assert abs(float(y.std()) - 1.0) < 0.02
  y, _ = augment(jax.random.PRNGKey(0), x, lengths, _cfg(constant_offset_std=0.2))
  np.testing.assert_allclose(np.asarray(y[:, 0]), np.asarray(y[:, -1]))  # constant over time
  assert abs(float(y[:, 0].std()) - 0.2) < 0.03
  y, _ = augment(jax.random.PRNGKey(0), x, lengths, _cfg(random_walk_std=0.1))
  steps = np.diff(np.asarray(y), axis=1)
  assert abs(steps.std() - 0.1) < 0.005  # increments are the i.i.d. steps
  y, _ = augment(jax.random.PRNGKey(0), jnp.ones((2, 5, 4)), jnp.full((2,), 5), _cfg(static_gain_std=0.5))
  assert float(jnp.abs(y - 1).max()) > 0.1  # a per-trial channel mixing was applied


def test_eval_path_only_smooths():
  x = np.random.default_rng(1).standard_normal((1, 40, 2)).astype(np.float32)
  y, lengths = preprocess(None, jnp.asarray(x), jnp.array([40]), default.get_config().aug)
  want = np.stack([np.convolve(x[0, :, c], SPEC_TAPS, mode="same") for c in range(2)], -1)
  np.testing.assert_allclose(np.asarray(y[0]), want, atol=1e-3)  # SPEC_TAPS are rounded to 4 decimals
  assert int(lengths[0]) == 40


def _numpy_reference(x, lengths, draws, cfg):
  """SPEC §4 written out in NumPy, loop by loop, from the same standard-normal draws."""
  x = x.astype(np.float64).copy()
  b, t, f = x.shape
  if "gain" in draws:
    for i in range(b):
      x[i] = x[i] @ (np.eye(f) + cfg.static_gain_std * draws["gain"][i])
  if "white" in draws:
    x += cfg.white_noise_std * draws["white"]
  if "offset" in draws:
    for i in range(b):
      for ch in range(f):
        x[i, :, ch] += cfg.constant_offset_std * draws["offset"][i, 0, ch]
  if "walk" in draws:
    for i in range(b):
      acc = np.zeros(f)
      for k in range(t):
        acc = acc + cfg.random_walk_std * draws["walk"][i, k]
        x[i, k] += acc
  lengths = lengths.copy()
  if "cut" in draws:
    c = int(draws["cut"])
    x = np.concatenate([x[:, c:], np.zeros((b, c, f))], axis=1)  # features[:, c:], then re-padded
    lengths = np.maximum(lengths - c, 0)
  for i in range(b):
    x[i, lengths[i] :] = 0
  return x, lengths


@pytest.mark.parametrize(
  "field, value",
  [
    ("static_gain_std", 0.3),
    ("white_noise_std", 1.0),
    ("constant_offset_std", 0.2),
    ("random_walk_std", 0.05),
    ("random_cut", 3),
  ],
)
def test_each_transform_matches_its_numpy_definition(field, value):
  x = np.random.default_rng(2).standard_normal((3, 12, 4)).astype(np.float32)
  lengths = np.array([12, 9, 5])
  cfg = _cfg(**{field: value})
  for seed in range(4):  # several cuts c
    draws = draw(jax.random.PRNGKey(seed), x.shape, cfg)
    assert len(draws) == 1  # only the enabled transform draws
    got, got_len = apply(jnp.asarray(x), jnp.asarray(lengths), draws, cfg)
    want, want_len = _numpy_reference(x, lengths, {k: np.asarray(v) for k, v in draws.items()}, cfg)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got_len), want_len)


def test_all_transforms_together_match_numpy_in_the_reference_order():
  x = np.random.default_rng(3).standard_normal((2, 10, 3)).astype(np.float32)
  lengths = np.array([10, 7])
  cfg = _cfg(static_gain_std=0.2, white_noise_std=1.0, constant_offset_std=0.2, random_walk_std=0.1, random_cut=3)
  draws = draw(jax.random.PRNGKey(7), x.shape, cfg)
  got, got_len = augment(jax.random.PRNGKey(7), jnp.asarray(x), jnp.asarray(lengths), cfg)
  want, want_len = _numpy_reference(x, lengths, {k: np.asarray(v) for k, v in draws.items()}, cfg)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(got_len), want_len)


def test_draws_are_standard_normal_and_uniform_cuts():
  cfg = _cfg(static_gain_std=1.0, white_noise_std=1.0, constant_offset_std=1.0, random_walk_std=1.0, random_cut=3)
  d = draw(jax.random.PRNGKey(0), (32, 100, 8), cfg)
  for k in ("gain", "white", "offset", "walk"):
    v = np.asarray(d[k])
    assert abs(v.mean()) < 0.05 and abs(v.std() - 1) < 0.05, k
  assert not np.allclose(np.asarray(d["white"]), np.asarray(d["walk"]))  # independent streams
  cuts = [int(draw(jax.random.PRNGKey(s), (1, 5, 1), cfg)["cut"]) for s in range(300)]
  assert set(cuts) == {0, 1, 2} and all(abs(cuts.count(c) / 300 - 1 / 3) < 0.08 for c in range(3))
