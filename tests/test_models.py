"""Front end, gradient reversal, decoders: layout, gather, gradients, exact parameter counts, modes, bf16."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import linen as nn
from optax.tree import norm as optax_norm

from b2t_jax.models import create_model, gradient_reversal
from b2t_jax.models.decoders import ModelHParams, model_hparams
from b2t_jax.models.frontend import DayFrontEnd, patchify
from b2t_jax.patching import n_patches
from b2t_jax.summary import parameter_counts
from configs import gru_baseline, tpu_v4


def test_patchify_matches_explicit_indexing():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 31, 3)).astype(np.float32)
  got = np.asarray(patchify(jnp.asarray(x), 14, 4))
  p = (31 - 14) // 4 + 1
  assert got.shape == (2, p, 14 * 3) and p == n_patches(31, 14, 4) == 5
  for b in range(2):
    for pi in range(p):
      for k in range(14):
        for d in range(3):
          assert got[b, pi, k * 3 + d] == x[b, 4 * pi + k, d]


def test_patchify_rejects_too_short_input():
  with pytest.raises(ValueError, match="shorter than one patch"):
    patchify(jnp.zeros((1, 13, 2)), 14, 4)


def test_day_layer_gather_matches_per_trial_loop():
  rng = np.random.default_rng(0)
  fe = DayFrontEnd(n_days=5, n_features=4, patch_size=2, patch_stride=1, dropout_rate=0.0)
  x = rng.standard_normal((3, 6, 4)).astype(np.float32)
  day = np.array([4, 0, 4], np.int32)
  params = nn.unbox(fe.init(jax.random.PRNGKey(0), x, day, deterministic=True)["params"])
  np.testing.assert_array_equal(np.asarray(params["day_weights"]), np.broadcast_to(np.eye(4), (5, 4, 4)))
  params = jax.tree.map(lambda p: p + jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
  got = np.asarray(fe.apply({"params": params}, x, day, deterministic=True))
  w, b = np.asarray(params["day_weights"]), np.asarray(params["day_biases"])
  for i in range(3):
    y = x[i] @ w[day[i]] + b[day[i]]
    y = y / (1 + np.abs(y))
    want = np.stack([np.concatenate([y[p], y[p + 1]]) for p in range(5)])
    np.testing.assert_allclose(got[i], want, atol=1e-6)


def test_day_layer_rejects_wrong_width():
  fe = DayFrontEnd(n_days=2, n_features=4, patch_size=2, patch_stride=1, dropout_rate=0.0)
  with pytest.raises(ValueError, match="expects 4"):
    fe.init(jax.random.PRNGKey(0), jnp.zeros((1, 5, 3)), jnp.zeros((1,), jnp.int32), deterministic=True)


def test_gradient_reversal_matches_finite_differences_with_traced_lambda():
  x0 = jnp.array([0.3, -1.2, 2.0])

  def f(x, lam):
    return jnp.sum(jnp.sin(gradient_reversal(x, lam)) * jnp.arange(1.0, 4.0))

  @jax.jit
  def grads(x, lam):  # lam is traced here, not static
    return jax.grad(f, argnums=(0, 1))(x, lam)

  for lam in (0.0, 0.5, 2.0):
    gx, glam = grads(x0, jnp.float32(lam))
    assert float(f(x0, lam)) == pytest.approx(float(jnp.sum(jnp.sin(x0) * jnp.arange(1.0, 4.0))))
    eps = 1e-3
    fd = np.array(
      [(float(f(x0.at[i].add(eps), lam)) - float(f(x0.at[i].add(-eps), lam))) / (2 * eps) for i in range(3)]
    )
    np.testing.assert_allclose(np.asarray(gx), -lam * fd, rtol=1e-3, atol=1e-4)
    assert float(glam) == 0.0


def test_parameter_counts_are_exact_at_full_size():
  assert parameter_counts(gru_baseline.get_config()) == {
    "frontend": 11_819_520,
    "gru": 32_464_128,
    "out": 31_529,
    "total": 44_315_177,
  }
  assert parameter_counts(tpu_v4.get_config()) == {
    "noise_model": 628_475_392,
    "clean_model": 37_228_073,
    "noisy_model": 21_865_001,
    "total": 687_568_466,
  }


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triple_modes_shapes_and_dtypes(tiny, dtype):
  tiny.model.dtype = dtype
  model = create_model(tiny)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 40, 8)), jnp.float32)
  day = jnp.array([0, 2], jnp.int32)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), x, day)["params"])
  assert set(params) == {"noise_model", "clean_model", "noisy_model"}
  p = n_patches(40, 14, 4)
  logits = model.apply({"params": params}, x, day, mode="inference")
  assert logits.shape == (2, p, 41) and logits.dtype == jnp.float32
  full = model.apply(
    {"params": params}, x, day, mode="full", train=True, grl_lambda=0.3, rngs={"dropout": jax.random.PRNGKey(1)}
  )
  assert sorted(full) == ["intermediate", "logits", "noise", "noisy_logits"] and full["intermediate"] == ()
  clean, noisy, noise = full["logits"], full["noisy_logits"], full["noise"]
  assert clean.shape == noisy.shape == (2, p, 41) and clean.dtype == noisy.dtype == jnp.float32
  assert noise.shape == (2, p, 14 * 8) and noise.dtype == jnp.dtype(dtype)
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(params))
  np.testing.assert_allclose(model.apply({"params": params}, x, day, mode="full")["logits"], logits, atol=1e-6)
  with pytest.raises(ValueError, match="unknown mode"):
    model.apply({"params": params}, x, day, mode="bogus")


def test_triple_noise_gets_reversed_gradient_from_noisy_branch(tiny):
  """Through the noisy branch the noise model gets -lambda x the true gradient (a central difference along a
  random direction: the forward pass does not depend on lambda); the clean branch's gradients, and the noisy
  decoder's own, do not depend on lambda."""
  model = create_model(tiny)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 40, 8)), jnp.float32)
  day = jnp.array([0, 1], jnp.int32)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), x, day)["params"])
  weights = jnp.asarray(np.random.default_rng(1).standard_normal((41,)), jnp.float32)

  @jax.jit
  def branches(p, lam, mix):  # mix @ (clean, noisy) weighted logit sums: one compile serves both branches
    out = model.apply({"params": p}, x, day, mode="full", grl_lambda=lam)
    clean, noisy = out["logits"], out["noisy_logits"]
    return mix @ jnp.stack([jnp.sum(clean @ weights), jnp.sum(noisy @ weights)])

  grad = jax.jit(jax.grad(branches))
  clean_only, noisy_only = jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])

  rng = np.random.default_rng(2)
  direction = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32), params["noise_model"])
  norm = float(optax_norm(direction))
  eps = 1e-2 / norm

  def shifted(sign):
    return {**params, "noise_model": jax.tree.map(lambda a, d: a + sign * eps * d, params["noise_model"], direction)}

  up, down = (float(branches(shifted(sign), 0.5, noisy_only)) for sign in (1, -1))
  true_slope = (up - down) / (2 * eps)
  assert abs(true_slope) > 1e-2 * norm
  for lam in (0.5, 2.0):
    g = grad(params, jnp.float32(lam), noisy_only)
    slope = sum(float(jnp.vdot(a, d)) for a, d in zip(jax.tree.leaves(g["noise_model"]), jax.tree.leaves(direction)))
    np.testing.assert_allclose(slope, -lam * true_slope, rtol=2e-2)
  g_noisy = [grad(params, jnp.float32(lam), noisy_only)["noisy_model"] for lam in (0.5, 2.0)]
  jax.tree.map(np.testing.assert_array_equal, *g_noisy)
  g_clean = [grad(params, jnp.float32(lam), clean_only) for lam in (0.5, 2.0)]
  jax.tree.map(np.testing.assert_array_equal, *g_clean)
  assert float(jnp.abs(g_clean[0]["noise_model"]["gru"]["h0"]).sum()) > 0  # the clean branch reaches the noise model


@pytest.mark.parametrize("kind", ["gru", "triple"])
def test_every_parameter_declares_one_logical_axis_name_per_dimension(kind):
  """Shardings come from the logical names (config.logical_axis_rules), so no parameter may go unannotated."""
  tiny = tiny_config()
  tiny.model.kind, tiny.model.patch_features = kind, 3  # the projection too
  model = create_model(tiny)
  x = jnp.zeros((1, 32, tiny.data.n_features // tiny.data.feature_pool))
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, jnp.zeros((1,), jnp.int32)))["params"]
  leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))
  ruled = {name for name, _ in tiny.logical_axis_rules}
  assert len(leaves) > 10
  for path, leaf in leaves:
    where = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.LogicallyPartitioned), where
    assert len(leaf.names) == leaf.value.ndim, where
    assert set(leaf.names) - {None} <= ruled, where  # every name is mapped by the rules
  day = [leaf for path, leaf in leaves if "day_weights" in jax.tree_util.keystr(path)]
  assert day and all(leaf.names[0] == "days" for leaf in day)


def test_model_hparams_are_typed_frozen_and_complete():
  tiny = tiny_config()
  hp = model_hparams(tiny)
  assert isinstance(hp, ModelHParams) and hp.n_days == len(tiny.data.sessions)
  assert hp.n_input_features == tiny.data.n_features // tiny.data.feature_pool and hp.hidden == tiny.model.hidden
  hash(hp)  # modules hold it as an attribute
  with pytest.raises(dataclasses.FrozenInstanceError):
    hp.hidden = 1
  tiny.model.not_a_knob = 1
  with pytest.raises(ValueError, match=r"unknown fields \['not_a_knob'\]"):
    model_hparams(tiny)
