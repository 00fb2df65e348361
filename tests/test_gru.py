"""The GRU layer against the SPEC equations in NumPy and against torch.nn.GRU with the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import scan_carries
from flax import linen as nn

from b2t_jax.models.gru import GRULayer, GRUStack


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def numpy_gru(x, h0, w_ih, w_hh, b_ih, b_hh):
  """SPEC §3.2 written out per time step; weights in PyTorch layout (3H, in), rows [r; z; n]."""
  hdim = w_hh.shape[1]
  h = np.broadcast_to(h0, (x.shape[0], hdim)).astype(np.float64)
  out = []
  for t in range(x.shape[1]):
    gi = x[:, t] @ w_ih.T + b_ih
    gh = h @ w_hh.T + b_hh
    r = _sigmoid(gi[:, :hdim] + gh[:, :hdim])
    z = _sigmoid(gi[:, hdim : 2 * hdim] + gh[:, hdim : 2 * hdim])
    n = np.tanh(gi[:, 2 * hdim :] + r * gh[:, 2 * hdim :])
    h = (1 - z) * n + z * h
    out.append(h)
  return np.stack(out, axis=1)


def _layer_params(p):
  """Our (in, 3, H) / (3, H) layout -> PyTorch's (3H, in) / (3H,), rows [r; z; n]."""
  w_ih, w_hh = np.asarray(p["w_ih"]), np.asarray(p["cell"]["w_hh"])
  return (
    w_ih.reshape(w_ih.shape[0], -1).T,
    w_hh.reshape(w_hh.shape[0], -1).T,
    np.asarray(p["b_ih"]).reshape(-1),
    np.asarray(p["cell"]["b_hh"]).reshape(-1),
  )


def test_gru_layer_matches_numpy_spec():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 7, 5)).astype(np.float32)
  h0 = rng.standard_normal((4,)).astype(np.float32)
  layer = GRULayer(hidden=4)
  params = nn.unbox(layer.init(jax.random.PRNGKey(1), x, h0)["params"])
  got = np.asarray(layer.apply({"params": params}, x, h0))
  want = numpy_gru(x.astype(np.float64), h0, *_layer_params(params))
  assert got.shape == (3, 7, 4) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_gru_init_follows_spec():
  layer = GRULayer(hidden=32)
  params = nn.unbox(layer.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 48)), jnp.zeros((32,)))["params"])
  w_hh = np.asarray(params["cell"]["w_hh"]).reshape(32, 96)  # rows orthonormal == torch's (3H, H) columns
  np.testing.assert_allclose(w_hh @ w_hh.T, np.eye(32), atol=1e-5)
  bound = 1 / np.sqrt(32)
  for b in (params["b_ih"], params["cell"]["b_hh"]):
    assert np.abs(np.asarray(b)).max() <= bound and np.abs(np.asarray(b)).max() > 0.5 * bound
  xavier = np.sqrt(6 / (48 + 96))
  assert np.abs(np.asarray(params["w_ih"])).max() <= xavier


def test_gru_stack_matches_torch():
  import torch  # the [test] extra installs it; a missing torch is a failure, not a skip

  rng = np.random.default_rng(0)
  b, t, d_in, hdim, layers = 2, 9, 12, 8, 3
  x = rng.standard_normal((b, t, d_in)).astype(np.float32)
  stack = GRUStack(n_layers=layers, hidden=hdim, dropout_rate=0.0)
  params = nn.unbox(stack.init(jax.random.PRNGKey(3), x, deterministic=True)["params"])
  got = np.asarray(stack.apply({"params": params}, x, deterministic=True))

  ref = torch.nn.GRU(d_in, hdim, num_layers=layers, batch_first=True)
  with torch.no_grad():
    for k in range(layers):
      w_ih, w_hh, b_ih, b_hh = _layer_params(params[f"layer_{k}"])
      getattr(ref, f"weight_ih_l{k}").copy_(torch.tensor(w_ih))
      getattr(ref, f"weight_hh_l{k}").copy_(torch.tensor(w_hh))
      getattr(ref, f"bias_ih_l{k}").copy_(torch.tensor(b_ih))
      getattr(ref, f"bias_hh_l{k}").copy_(torch.tensor(b_hh))
    h0 = torch.tensor(np.asarray(params["h0"])).expand(layers, b, hdim).contiguous()
    want, _ = ref(torch.from_numpy(x), h0)
  np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backward", ["custom", "autodiff"])
def test_gru_bf16_keeps_fp32_carry_and_close_values(backward):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 6, 16)).astype(np.float32)
  h0 = np.zeros((8,), np.float32)
  f32 = GRULayer(hidden=8, backward=backward)
  params = nn.unbox(f32.init(jax.random.PRNGKey(0), x, h0)["params"])
  bf16 = GRULayer(hidden=8, dtype=jnp.bfloat16, backward=backward)
  out16 = bf16.apply({"params": params}, x, h0)
  assert out16.dtype == jnp.bfloat16 and out16.shape == (2, 6, 8)
  out32 = f32.apply({"params": params}, x, h0)
  np.testing.assert_allclose(np.asarray(out16, np.float32), np.asarray(out32), atol=3e-2)
  # The state the recurrence carries from step to step (forward scan, and the reverse scan of the gradient) is
  # fp32 although the matmul inputs are bf16.
  loss = lambda p: jnp.sum(bf16.apply({"params": p}, x, h0).astype(jnp.float32))
  jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
  carries = [a for a in scan_carries(jaxpr.jaxpr) if a.shape == (2, 8)]
  assert len(carries) >= 2, carries  # forward h, backward dL/dh
  assert all(a.dtype == jnp.float32 for a in carries), carries


def _grads_both_ways(dtype, x, h0, seed=0):
  """Values and gradients (w.r.t. params and input) of a random projection of GRULayer's output, per backward."""
  ref = GRULayer(hidden=h0.shape[-1], dtype=dtype, backward="autodiff")
  params = nn.unbox(ref.init(jax.random.PRNGKey(seed), x, h0)["params"])
  proj = jax.random.normal(jax.random.PRNGKey(seed + 1), x.shape[:2] + h0.shape[-1:])
  out = {}
  for backward in ("autodiff", "custom"):
    layer = GRULayer(hidden=h0.shape[-1], dtype=dtype, backward=backward)

    def loss(p, x, h0):
      return jnp.sum(layer.apply({"params": p}, x, h0).astype(jnp.float32) * proj)

    out[backward] = jax.value_and_grad(loss, argnums=(0, 1, 2))(params, x, h0)
  return out


def test_custom_vjp_matches_autodiff_of_the_scan():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 11, 6)), jnp.float32)
  h0 = jnp.asarray(rng.standard_normal((5,)), jnp.float32)
  got = _grads_both_ways(jnp.float32, x, h0)
  np.testing.assert_allclose(got["custom"][0], got["autodiff"][0], rtol=1e-6)
  flat_c, tree_c = jax.tree.flatten(got["custom"][1])
  flat_a, tree_a = jax.tree.flatten(got["autodiff"][1])
  assert tree_c == tree_a  # same parameter tree: checkpoints and sharding rules do not depend on the choice
  for c, a in zip(flat_c, flat_a):
    assert c.shape == a.shape and c.dtype == a.dtype
    np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-6)


def test_custom_vjp_matches_finite_differences():
  rng = np.random.default_rng(1)
  # float32 central differences on a few kernel entries: the analytic gradient must agree to ~1e-3 relative.
  x = jnp.asarray(rng.standard_normal((2, 5, 3)), jnp.float32)
  h0 = jnp.asarray(rng.standard_normal((4,)), jnp.float32)
  layer = GRULayer(hidden=4, backward="custom")
  params = nn.unbox(layer.init(jax.random.PRNGKey(2), x, h0)["params"])
  proj = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 4))
  loss = jax.jit(lambda p: jnp.sum(layer.apply({"params": p}, x, h0) * proj))
  grad = jax.grad(loss)(params)["cell"]["w_hh"]
  eps = 1e-2
  for idx in [(0, 0, 0), (1, 2, 3), (3, 1, 2), (2, 0, 1)]:

    def shifted(delta):
      w = params["cell"]["w_hh"].at[idx].add(delta)
      return float(loss({**params, "cell": {**params["cell"], "w_hh": w}}))

    fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
    np.testing.assert_allclose(float(grad[idx]), fd, rtol=2e-2, atol=2e-4)


def test_custom_vjp_bf16_matches_autodiff_dtypes_and_values():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 7, 8)), jnp.float32)
  h0 = jnp.zeros((8,), jnp.float32)
  got = _grads_both_ways(jnp.bfloat16, x, h0)
  np.testing.assert_allclose(got["custom"][0], got["autodiff"][0], rtol=2e-2)
  for c, a in zip(jax.tree.leaves(got["custom"][1]), jax.tree.leaves(got["autodiff"][1])):
    assert c.dtype == a.dtype == jnp.float32
    np.testing.assert_allclose(c, a, rtol=5e-2, atol=5e-2)


def test_stack_gradients_equal_across_unroll_remat_and_backward():
  """The speed knobs (unroll, remat, backward) change how the step is computed, never what (dropout on)."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 9, 6)), jnp.float32)
  proj = jax.random.normal(jax.random.PRNGKey(7), (2, 9, 5))
  base = GRUStack(n_layers=3, hidden=5, dropout_rate=0.3)
  params = nn.unbox(base.init(jax.random.PRNGKey(0), x, deterministic=True)["params"])
  results = {}
  for knobs in [dict(), dict(unroll=4), dict(remat=True), dict(backward="autodiff", unroll=2)]:
    stack = GRUStack(n_layers=3, hidden=5, dropout_rate=0.3, **knobs)
    loss = lambda p: jnp.sum(
      stack.apply({"params": p}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(5)}) * proj
    )
    results[str(knobs)] = jax.jit(jax.value_and_grad(loss))(params)
  ref_value, ref_grads = results.pop("{}")
  for name, (value, grads) in results.items():
    np.testing.assert_allclose(value, ref_value, rtol=1e-6, err_msg=name)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6, err_msg=name)


def _stack_value_and_grads(n_layers, dropout, x, proj, params=None, **knobs):
  """Value and gradients (params, input) of a random projection of GRUStack's output (dropout PRNG fixed)."""
  stack = GRUStack(n_layers=n_layers, hidden=proj.shape[-1], dropout_rate=0.3, **knobs)
  if params is None:
    params = nn.unbox(stack.init(jax.random.PRNGKey(0), x, deterministic=True)["params"])

  def loss(p, x):
    y = stack.apply({"params": p}, x, deterministic=not dropout, rngs={"dropout": jax.random.PRNGKey(5)})
    return jnp.sum(y.astype(jnp.float32) * proj)

  return params, jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)


@pytest.mark.slow
def test_wavefront_matches_layer_by_layer_values_and_gradients():
  """One scan over all layers (ramp-up/ramp-down slots masked, same dropout masks) computes the same function,
  and both its backward passes (custom VJP, JAX autodiff) give the layer-by-layer gradients."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((2, 7, 6)), jnp.float32)
  proj = jax.random.normal(jax.random.PRNGKey(8), (2, 7, 5))
  for n_layers in (1, 2, 3):
    for dropout in (False, True):
      name = f"layers={n_layers} dropout={dropout}"
      params, (ref_value, ref_grads) = _stack_value_and_grads(n_layers, dropout, x, proj)
      wave_init = GRUStack(n_layers=n_layers, hidden=5, dropout_rate=0.3, wavefront=True).init(
        jax.random.PRNGKey(0), x, deterministic=True
      )["params"]
      # Same parameter tree, names and init: checkpoints and imports do not depend on the flag.
      assert jax.tree.structure(nn.unbox(wave_init)) == jax.tree.structure(params), name
      for w, p in zip(jax.tree.leaves(nn.unbox(wave_init)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(w, p, err_msg=name)
      # The custom VJP everywhere; autodiff, unroll and remat (which change how the scan is computed, not
      # what) at 3 layers only, to keep the test fast.
      variants = [dict()]
      if n_layers == 3:
        variants += [dict(backward="autodiff")]
      if n_layers == 3 and dropout:
        variants += [dict(unroll=3, remat=True), dict(backward="autodiff", unroll=2, remat=True)]
      for knobs in variants:
        _, (value, grads) = _stack_value_and_grads(n_layers, dropout, x, proj, params, wavefront=True, **knobs)
        np.testing.assert_allclose(value, ref_value, rtol=1e-5, err_msg=f"{name} {knobs}")
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
          np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6, err_msg=f"{name} {knobs}")


def test_wavefront_dropout_is_the_layer_by_layer_dropout():
  """With dropout on, the wavefront must reuse the layer-by-layer masks: a different draw changes the output."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((2, 6, 4)), jnp.float32)
  stack = GRUStack(n_layers=3, hidden=6, dropout_rate=0.5)
  wave = GRUStack(n_layers=3, hidden=6, dropout_rate=0.5, wavefront=True)
  params = stack.init(jax.random.PRNGKey(1), x, deterministic=True)
  apply = {
    name: jax.jit(lambda key, m=m: m.apply(params, x, deterministic=False, rngs={"dropout": key}))
    for name, m in (("stack", stack), ("wave", wave))
  }
  run = lambda name, seed: np.asarray(apply[name](jax.random.PRNGKey(seed)))
  np.testing.assert_allclose(run("wave", 2), run("stack", 2), rtol=1e-6, atol=1e-7)
  assert np.abs(run("wave", 3) - run("stack", 2)).max() > 1e-3  # the masks matter at this rate


@pytest.mark.slow
def test_wavefront_bf16_runs_and_is_close():
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((2, 8, 6)), jnp.float32)
  proj = jax.random.normal(jax.random.PRNGKey(9), (2, 8, 8))
  params, (ref_value, ref_grads) = _stack_value_and_grads(3, True, x, proj)
  wave = GRUStack(n_layers=3, hidden=8, dropout_rate=0.3, wavefront=True, dtype=jnp.bfloat16)
  assert wave.apply({"params": params}, x, deterministic=True).dtype == jnp.bfloat16
  for backward in ("custom", "autodiff"):
    _, (value, grads) = _stack_value_and_grads(
      3, True, x, proj, params, wavefront=True, dtype=jnp.bfloat16, backward=backward
    )
    np.testing.assert_allclose(value, ref_value, rtol=5e-2, atol=5e-2, err_msg=backward)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      assert g.dtype == jnp.float32
      np.testing.assert_allclose(g, r, rtol=5e-2, atol=5e-2, err_msg=backward)


@pytest.mark.slow
@pytest.mark.isolated  # a (4, 2) mesh: collectives inside the GRU's loops (conftest.py)
def test_wavefront_train_step_matches_on_a_model_parallel_mesh(tiny):
  """model.gru_wavefront reaches every GRU stack of the triple model; with the noise GRU's hidden axis split over
  'model' (mesh 4x2) and dropout on, the train-step loss is that of the layer-by-layer run on 8x1."""
  from test_train import _batches, _losses

  from b2t_jax import experiment
  from b2t_jax.sharding import create_mesh

  batches = _batches(tiny, 1)  # one step: each new batch shape would compile both models again
  ref, _ = _losses(experiment.Experiment(tiny, mesh=create_mesh((8, 1))), batches)
  tiny.model.gru_wavefront = True
  seen = []  # the `wavefront` field of every GRUStack the model calls while the step is traced

  def spy(next_fun, args, kwargs, context):
    if isinstance(context.module, GRUStack) and context.method_name == "__call__":
      seen.append(context.module.wavefront)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(spy):
    got, _ = _losses(experiment.Experiment(tiny, mesh=create_mesh((4, 2))), batches)
  assert seen and all(seen), seen
  np.testing.assert_allclose(got, ref, rtol=2e-5)


def test_stack_step_continues_the_offline_recurrence_and_skips_invalid_slots():
  """GRUStack.step (streaming) from initial_carry, a few slots at a time, gives the offline outputs; an invalid
  slot leaves every layer's state untouched."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((1, 6, 4)), jnp.float32)
  stack = GRUStack(n_layers=2, hidden=5, dropout_rate=0.3)
  params = {"params": nn.unbox(stack.init(jax.random.PRNGKey(0), x, deterministic=True)["params"])}
  want = stack.apply(params, x, deterministic=True)
  carry = stack.apply(params, 1, method="initial_carry")
  assert carry.shape == (2, 1, 5)
  got = []
  for s in range(0, 6, 2):
    y, carry = stack.apply(params, x[:, s : s + 2], jnp.ones((2,), bool), carry, method="step")
    got.append(y)
  np.testing.assert_allclose(jnp.concatenate(got, axis=1), want, atol=1e-6, rtol=0)
  _, kept = stack.apply(params, x[:, :2], jnp.array([False, False]), carry, method="step")
  np.testing.assert_array_equal(kept, carry)
