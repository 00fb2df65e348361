"""CTC against a NumPy forward-algorithm reference; infeasible-trial masking; the triple objective."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config

from b2t_jax import experiment, losses, sharding
from b2t_jax.data.augment import preprocess


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
  nll, feasible = losses.ctc_per_trial(
    jnp.asarray(logits), jnp.asarray(input_lens), jnp.asarray(labels), jnp.asarray(label_lens)
  )
  assert np.asarray(feasible).all()
  for i in range(4):
    want = numpy_ctc_nll(logits[i, : input_lens[i]].astype(np.float64), labels[i, : label_lens[i]].tolist())
    np.testing.assert_allclose(float(nll[i]), want, rtol=1e-5, atol=1e-4)


def test_min_ctc_frames_counts_repeats():
  labels = jnp.array([[3, 3, 4, 4, 4, 0], [1, 2, 1, 2, 0, 0]])
  np.testing.assert_array_equal(losses.min_ctc_frames(labels, jnp.array([5, 4])), [8, 4])
  # padding beyond label_lens never counts as a repeat
  np.testing.assert_array_equal(losses.min_ctc_frames(jnp.array([[5, 0, 0]]), jnp.array([1])), [1])


def test_infeasible_trials_are_masked_counted_and_get_no_gradient():
  rng = np.random.default_rng(1)
  logits, labels, input_lens, label_lens = _case(rng)
  input_lens[2] = 3  # 4 labels cannot fit in 3 frames
  weights = np.array([1, 1, 1, 0], np.float32)  # row 3 is batch padding

  def loss(lg):
    return losses.decoder_loss(
      {"logits": lg},
      jnp.asarray(input_lens),
      jnp.asarray(labels),
      jnp.asarray(label_lens),
      jnp.asarray(weights),
      noisy_weight=0.2,
      noise_l2_weight=0.0,
    )

  (value, aux), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(logits))
  assert int(aux["n_infeasible"]) == 1 and float(aux["n_trials"]) == 2.0
  want = np.mean(
    [numpy_ctc_nll(logits[i, : input_lens[i]].astype(np.float64), labels[i, : label_lens[i]].tolist()) for i in (0, 1)]
  )
  np.testing.assert_allclose(float(value), want, rtol=1e-5)
  grad = np.asarray(grad)
  assert np.all(grad[2] == 0) and np.all(grad[3] == 0) and np.abs(grad[0]).sum() > 0
  raw, _ = losses.ctc_per_trial(
    jnp.asarray(logits), jnp.asarray(input_lens), jnp.asarray(labels), jnp.asarray(label_lens)
  )
  assert float(raw[2]) > 1e3  # what optax returns for it, and why it must be masked


def test_triple_objective_combines_terms():
  rng = np.random.default_rng(2)
  logits, labels, input_lens, label_lens = _case(rng)
  noisy = rng.standard_normal(logits.shape).astype(np.float32)
  noise = rng.standard_normal((4, 12, 3)).astype(np.float32)
  args = (jnp.asarray(input_lens), jnp.asarray(labels), jnp.asarray(label_lens), jnp.ones(4))
  clean_only, _ = losses.decoder_loss({"logits": jnp.asarray(logits)}, *args, noisy_weight=0.2, noise_l2_weight=0.0)
  noisy_only, _ = losses.decoder_loss({"logits": jnp.asarray(noisy)}, *args, noisy_weight=0.2, noise_l2_weight=0.0)
  outputs = {"logits": jnp.asarray(logits), "noisy_logits": jnp.asarray(noisy), "noise": jnp.asarray(noise)}
  total, aux = losses.decoder_loss(outputs, *args, noisy_weight=0.2, noise_l2_weight=0.5)
  np.testing.assert_allclose(
    float(total), float(clean_only) + 0.2 * float(noisy_only) + 0.5 * np.mean(noise**2), rtol=1e-6
  )
  np.testing.assert_allclose(float(aux["ctc_noisy"]), float(noisy_only), rtol=1e-6)


def frames_needed(labels) -> int:
  """Fewest CTC frames for `labels`, from the definition: one per label and a blank between equal neighbours."""
  labels = np.asarray(labels)
  return len(labels) + int(np.sum(labels[1:] == labels[:-1]))


def hand_batch(config, n_features, day=(0, 1, 2, 0, 1, 2, 0, 0)):
  """8 rows of days `day`: 5 trials that fit, one whose 12 labels cannot fit its 2 patches, two padding rows
  (weight 0)."""
  rng = np.random.default_rng(3)
  n_time_steps = np.array([64, 50, 40, 45, 64, 20, 0, 0], np.int32)
  label_lens = np.array([5, 8, 3, 6, 2, 12, 0, 0], np.int32)
  labels = np.zeros((8, config.data.max_label_len), np.int32)
  for i, n in enumerate(label_lens):
    labels[i, :n] = rng.integers(1, config.model.n_classes, n)
  labels[0, 1] = labels[0, 0]  # a repeat: needs a blank between
  features = rng.standard_normal((8, 64, n_features)).astype(np.float32)
  features *= np.arange(64)[None, :, None] < n_time_steps[:, None, None]
  return {
    "features": features,
    "n_time_steps": n_time_steps,
    "labels": labels,
    "label_lens": label_lens,
    "day": np.array(day, np.int32),
    "weight": np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32),
  }


@pytest.mark.slow
def test_train_step_loss_is_the_triple_objective_with_the_lambda_ramp():
  """The real jitted train_step, step by step, against a NumPy CTC on the model's own outputs:
  loss = CTC(clean) + noisy_weight * CTC(noisy) + noise_l2_weight * mean(noise^2), CTC averaged over the
  feasible real trials; λ at step s = grl_lambda * min(s / adversarial_warmup_steps, 1), and the gradient
  (its norm) is the one of that λ."""
  c = tiny_config()
  c.aug.white_noise_std = c.aug.constant_offset_std = 0.0  # deterministic inputs: smoothing only
  c.aug.random_cut = 0
  c.model.input_dropout = c.model.rnn_dropout = 0.0
  c.optim.warmup_steps = c.optim.day_warmup_steps = 0  # the parameters move from step 0 on
  noisy_w, l2_w, warm, grl = 0.3, 0.7, 4, 0.5
  c.loss.noisy_weight, c.loss.noise_l2_weight, c.loss.adversarial_warmup_steps = noisy_w, l2_w, warm
  c.model.grl_lambda = grl
  exp = experiment.Experiment(c)
  batch = hand_batch(c, exp.n_features)
  x, _ = preprocess(None, jnp.asarray(batch["features"]), jnp.asarray(batch["n_time_steps"]), c.aug)
  patches = (batch["n_time_steps"] - c.model.patch_size) // c.model.patch_stride + 1
  refs = [batch["labels"][i, : batch["label_lens"][i]] for i in range(8)]
  fits = [i for i in range(8) if batch["weight"][i] > 0 and 1 <= patches[i] and frames_needed(refs[i]) <= patches[i]]
  assert fits == [0, 1, 2, 3, 4]

  @jax.jit
  def reference(params, lam):  # the model's outputs and the gradient of the objective at this λ
    def loss(p):
      outputs = exp.model.apply({"params": p}, x, jnp.asarray(batch["day"]), mode="full", grl_lambda=lam)
      return losses.decoder_loss(
        outputs,
        jnp.asarray(patches),
        jnp.asarray(batch["labels"]),
        jnp.asarray(batch["label_lens"]),
        jnp.asarray(batch["weight"]),
        noisy_weight=noisy_w,
        noise_l2_weight=l2_w,
      )[0], outputs

    return jax.grad(loss, has_aux=True)(params)

  state = exp.init_state()
  sharded = sharding.shard_batch(batch, exp.mesh)
  for step in range(6):
    lam = grl * min(step / warm, 1.0)
    grads, out = jax.device_get(reference(state.params, jnp.float32(lam)))
    clean, noisy, noise = out["logits"], out["noisy_logits"], out["noise"]
    state, m = exp.train_step(state, sharded)
    m = jax.device_get(m)
    ctc = [
      np.mean([numpy_ctc_nll(np.asarray(o[i, : patches[i]], np.float64), refs[i]) for i in fits])
      for o in (clean, noisy)
    ]
    l2 = np.mean(np.square(np.asarray(noise, np.float64)))
    assert float(m["grl_lambda"]) == pytest.approx(lam, abs=1e-7)
    np.testing.assert_allclose([m["ctc"], m["ctc_noisy"], m["noise_l2"]], [ctc[0], ctc[1], l2], rtol=1e-4)
    np.testing.assert_allclose(m["loss"], ctc[0] + noisy_w * ctc[1] + l2_w * l2, rtol=1e-4)
    assert int(m["n_infeasible"]) == 1 and float(m["n_trials"]) == len(fits)
    np.testing.assert_allclose(m["grad_norm"], float(optax.tree.norm(grads)), rtol=1e-4)
