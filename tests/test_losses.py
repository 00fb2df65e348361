"""CTC against a NumPy forward-algorithm reference; infeasible-trial masking; the triple objective."""

import jax
import jax.numpy as jnp
import numpy as np

from b2t_jax import losses


def numpy_ctc_nll(logits, labels, blank=0):
  """-log p(labels | logits) by the CTC forward algorithm in log space (float64)."""
  lp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
  ext = [blank]
  for l in labels:
    ext += [l, blank]
  s = len(ext)
  alpha = np.full(s, -np.inf)
  alpha[0] = lp[0, blank]
  if s > 1:
    alpha[1] = lp[0, ext[1]]
  for t in range(1, lp.shape[0]):
    new = np.full(s, -np.inf)
    for i in range(s):
      a = alpha[i]
      if i >= 1:
        a = np.logaddexp(a, alpha[i - 1])
      if i >= 2 and ext[i] != blank and ext[i] != ext[i - 2]:
        a = np.logaddexp(a, alpha[i - 2])
      new[i] = a + lp[t, ext[i]]
    alpha = new
  return -np.logaddexp(alpha[-1], alpha[-2] if s > 1 else -np.inf)


def _case(rng, b=4, p=12, c=6, l=5):
  logits = rng.standard_normal((b, p, c)).astype(np.float32) * 2
  labels = rng.integers(1, c, (b, l)).astype(np.int32)
  labels[0, 1] = labels[0, 0]  # a repeat needs a blank between
  input_lens = np.array([12, 9, 7, 12], np.int32)
  label_lens = np.array([5, 3, 4, 0], np.int32)
  return logits, labels, input_lens, label_lens


def test_ctc_matches_numpy_forward_algorithm():
  logits, labels, input_lens, label_lens = _case(np.random.default_rng(0))
  nll, feasible = losses.ctc_per_trial(jnp.asarray(logits), jnp.asarray(input_lens), jnp.asarray(labels),
                                       jnp.asarray(label_lens))
  assert np.asarray(feasible).all()
  for i in range(4):
    want = numpy_ctc_nll(logits[i, :input_lens[i]].astype(np.float64), labels[i, :label_lens[i]].tolist())
    np.testing.assert_allclose(float(nll[i]), want, rtol=1e-5, atol=1e-4)


def test_min_ctc_frames_counts_repeats():
  labels = jnp.array([[3, 3, 4, 4, 4, 0], [1, 2, 1, 2, 0, 0]])
  np.testing.assert_array_equal(losses.min_ctc_frames(labels, jnp.array([5, 4])), [8, 4])
  # padding beyond label_lens never counts as a repeat
  np.testing.assert_array_equal(losses.min_ctc_frames(jnp.array([[5, 0, 0]]), jnp.array([1])), [1])


def test_infeasible_trials_are_masked_counted_and_get_no_gradient():
  rng = np.random.default_rng(1)
  logits, labels, input_lens, label_lens = _case(rng)
  input_lens[2] = 3      # 4 labels cannot fit in 3 frames
  weights = np.array([1, 1, 1, 0], np.float32)  # row 3 is batch padding

  def loss(lg):
    return losses.decoder_loss(lg, jnp.asarray(input_lens), jnp.asarray(labels), jnp.asarray(label_lens),
                               jnp.asarray(weights), noisy_weight=0.2, noise_l2_weight=0.0)

  (value, aux), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(logits))
  assert int(aux["n_infeasible"]) == 1 and float(aux["n_trials"]) == 2.0
  want = np.mean([numpy_ctc_nll(logits[i, :input_lens[i]].astype(np.float64), labels[i, :label_lens[i]].tolist())
                  for i in (0, 1)])
  np.testing.assert_allclose(float(value), want, rtol=1e-5)
  grad = np.asarray(grad)
  assert np.all(grad[2] == 0) and np.all(grad[3] == 0) and np.abs(grad[0]).sum() > 0
  raw, _ = losses.ctc_per_trial(jnp.asarray(logits), jnp.asarray(input_lens), jnp.asarray(labels),
                                jnp.asarray(label_lens))
  assert float(raw[2]) > 1e3   # what optax returns for it, and why it must be masked


def test_triple_objective_combines_terms():
  rng = np.random.default_rng(2)
  logits, labels, input_lens, label_lens = _case(rng)
  noisy = rng.standard_normal(logits.shape).astype(np.float32)
  noise = rng.standard_normal((4, 12, 3)).astype(np.float32)
  args = (jnp.asarray(input_lens), jnp.asarray(labels), jnp.asarray(label_lens), jnp.ones(4))
  clean_only, _ = losses.decoder_loss(jnp.asarray(logits), *args, noisy_weight=0.2, noise_l2_weight=0.0)
  noisy_only, _ = losses.decoder_loss(jnp.asarray(noisy), *args, noisy_weight=0.2, noise_l2_weight=0.0)
  total, aux = losses.decoder_loss((jnp.asarray(logits), jnp.asarray(noisy), jnp.asarray(noise)), *args,
                                   noisy_weight=0.2, noise_l2_weight=0.5)
  np.testing.assert_allclose(float(total), float(clean_only) + 0.2 * float(noisy_only) + 0.5 * np.mean(noise ** 2),
                             rtol=1e-6)
  np.testing.assert_allclose(float(aux["ctc_noisy"]), float(noisy_only), rtol=1e-6)
