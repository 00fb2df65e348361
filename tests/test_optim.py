"""AdamW groups, decay mask, schedule, clipping and the absent-day rule against a NumPy PyTorch-Adam reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from b2t_jax.optim import create_optimizer, decay_mask, lr_schedule, param_groups
from configs import default


def _cfg(**kw):
  c = default.get_config().optim
  c.warmup_steps = c.day_warmup_steps = 0
  c.lr_peak = c.day_lr_peak = 0.01
  c.lr_min = c.day_lr_min = 0.01
  c.decay_steps = 100
  c.grad_clip_norm = 0.0
  c.update(kw)
  return c


def _params():
  rng = np.random.default_rng(0)
  r = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return {
    "frontend": {"day_weights": r(3, 2, 2), "day_biases": r(3, 2)},
    "gru": {"h0": r(4), "layer_0": {"w_ih": r(2, 12), "b_ih": r(12), "cell": {"w_hh": r(4, 12), "b_hh": r(12)}}},
    "out": {"kernel": r(4, 5), "bias": r(5)},
  }


class TorchAdamW:
  """Reference: PyTorch AdamW for one tensor, which it skips when the tensor has no gradient."""

  def __init__(self, p, lr, b1, b2, eps, wd):
    self.p, self.lr, self.b1, self.b2, self.eps, self.wd = np.array(p, np.float64), lr, b1, b2, eps, wd
    self.m, self.v, self.t = np.zeros_like(self.p), np.zeros_like(self.p), 0

  def step(self, g):
    if g is None:
      return
    self.t += 1
    self.p *= 1 - self.lr * self.wd
    self.m = self.b1 * self.m + (1 - self.b1) * g
    self.v = self.b2 * self.v + (1 - self.b2) * g * g
    mhat, vhat = self.m / (1 - self.b1**self.t), self.v / (1 - self.b2**self.t)
    self.p -= self.lr * mhat / (np.sqrt(vhat) + self.eps)


def test_groups_and_decay_mask():
  p = _params()
  assert param_groups(p)["frontend"] == {"day_weights": "day", "day_biases": "day"}
  assert param_groups(p)["out"] == {"kernel": "main", "bias": "main"}
  m = decay_mask(p)
  assert m["gru"]["h0"] and m["gru"]["layer_0"]["w_ih"] and m["gru"]["layer_0"]["cell"]["w_hh"] and m["out"]["kernel"]
  assert not m["gru"]["layer_0"]["b_ih"] and not m["out"]["bias"] and not m["frontend"]["day_weights"]


def test_matches_torch_adamw_with_absent_days():
  cfg = _cfg()
  tx = create_optimizer(cfg)
  params = _params()
  state = tx.init(params)
  rng = np.random.default_rng(1)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = [jax.tree_util.keystr(k) for k, _ in flat]
  refs = {}
  for n, (_, leaf) in zip(names, flat):
    wd = cfg.weight_decay if any(s in n for s in ("w_ih", "w_hh", "kernel", "h0")) else 0.0
    if "day_" in n:  # one reference tensor per day, as the PyTorch model holds them
      refs[n] = [TorchAdamW(leaf[d], cfg.day_lr_peak, cfg.b1, cfg.b2, cfg.eps, 0.0) for d in range(3)]
    else:
      refs[n] = TorchAdamW(leaf, cfg.lr_peak, cfg.b1, cfg.b2, cfg.eps, wd)
  presence = [np.array([1, 1, 0], bool), np.array([0, 1, 1], bool), np.array([1, 0, 1], bool)]
  for present in presence:
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    # absent days have zero gradient, as the gather's transpose produces
    grads = jax.tree_util.tree_map_with_path(
      lambda k, g: g * present.reshape((-1,) + (1,) * (g.ndim - 1)) if "day_" in jax.tree_util.keystr(k) else g, grads
    )
    updates, state = tx.update(grads, state, params, day_present=jnp.asarray(present))
    params = optax.apply_updates(params, updates)
    for n, (_, g) in zip(names, jax.tree_util.tree_flatten_with_path(grads)[0]):
      g = np.asarray(g, np.float64)
      if "day_" in n:
        for d in range(3):
          refs[n][d].step(g[d] if present[d] else None)
      else:
        refs[n].step(g)
  for n, (_, p) in zip(names, jax.tree_util.tree_flatten_with_path(params)[0]):
    want = np.stack([r.p for r in refs[n]]) if "day_" in n else refs[n].p
    np.testing.assert_allclose(np.asarray(p), want, rtol=1e-5, atol=1e-6, err_msg=n)


def test_absent_day_params_and_moments_untouched():
  tx = create_optimizer(_cfg())
  params = _params()
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, new_state = tx.update(grads, state, params, day_present=jnp.array([True, False, True]))
  np.testing.assert_array_equal(np.asarray(updates["frontend"]["day_weights"][1]), 0.0)
  assert np.abs(np.asarray(updates["frontend"]["day_weights"][0])).min() > 0
  day_state = new_state[0].inner_states["day"].inner_state[0]
  np.testing.assert_array_equal(np.asarray(day_state.count["frontend"]["day_biases"]), [1, 0, 1])
  np.testing.assert_array_equal(np.asarray(day_state.mu["frontend"]["day_biases"][1]), 0.0)


def test_schedule_warmup_cosine_flat():
  s = lr_schedule(0.005, 1e-4, 1000, 120_000)
  assert float(s(0)) == 0.0
  np.testing.assert_allclose(float(s(500)), 0.0025, rtol=1e-6)
  np.testing.assert_allclose(float(s(1000)), 0.005, rtol=1e-6)
  mid = 1000 + (120_000 - 1000) / 2
  np.testing.assert_allclose(float(s(mid)), 1e-4 + (0.005 - 1e-4) / 2, rtol=1e-4)
  np.testing.assert_allclose([float(s(120_000)), float(s(200_000))], [1e-4, 1e-4], rtol=1e-6)


def test_global_norm_clipping_covers_both_groups():
  tx = create_optimizer(_cfg(grad_clip_norm=1.0))
  params = _params()
  grads = jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), params)
  _, state = tx.update(grads, tx.init(params), params, day_present=jnp.ones(3, bool))
  scale = 1.0 / float(optax.tree.norm(grads))  # one norm over day layers and the rest together
  inner = state[1].inner_states
  main_mu = inner["main"].inner_state[0].mu
  day_mu = inner["day"].inner_state[0].mu
  np.testing.assert_allclose(np.asarray(main_mu["out"]["kernel"]), 0.1 * 100.0 * scale, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(day_mu["frontend"]["day_weights"]), 0.1 * 100.0 * scale, rtol=1e-5)
