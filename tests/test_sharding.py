"""Model-parallel sharding of the noise GRU, mesh-independence of the loss, bf16 policy, jaxpr hygiene."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from b2t_jax import losses, train
from b2t_jax.sharding import create_mesh
from test_train import _batches, _losses


def test_noise_gru_kernels_are_split_over_model_axis(tiny):
  exp = train.Experiment(tiny, mesh=create_mesh((4, 2)))
  ps = exp.param_shardings
  layer = ps["noise_model"]["gru"]["layer_0"]
  assert layer["w_ih"].spec == P(None, None, "model") and layer["cell"]["w_hh"].spec == P(None, None, "model")
  assert ps["noise_model"]["gru"]["h0"].spec == P("model")
  assert ps["clean_model"]["gru"]["layer_0"]["cell"]["w_hh"].spec == P(None, None, None)
  assert ps["clean_model"]["frontend"]["day_weights"].spec == P()
  state = exp.init_state()
  w_hh = state.params["noise_model"]["gru"]["layer_1"]["cell"]["w_hh"]
  assert w_hh.addressable_shards[0].data.shape == (112, 3, 56)        # half of the hidden axis per device
  adamw = state.opt_state.inner_state[1].inner_states["main"].inner_state[0]   # inside apply_if_finite, the clip
  mu = adamw.mu["noise_model"]["gru"]["layer_1"]["cell"]["w_hh"]
  assert mu.sharding.spec == P(None, None, "model")                     # Adam moments follow their params


def test_same_losses_on_every_mesh_shape(tiny):
  batches = _batches(tiny, 3)
  results = {shape: _losses(train.Experiment(tiny, mesh=create_mesh(shape)), batches)[0]
             for shape in [(8, 1), (4, 2), (1, 8)]}
  # fp32 round-off from different reduction orders only
  np.testing.assert_allclose(results[(4, 2)], results[(8, 1)], rtol=2e-5)
  np.testing.assert_allclose(results[(1, 8)], results[(8, 1)], rtol=2e-5)


def test_bf16_step_matches_fp32_and_keeps_fp32_state(tiny):
  batches = _batches(tiny, 2)
  tiny.model.input_dropout = tiny.model.rnn_dropout = 0.0
  f32, _ = _losses(train.Experiment(tiny), batches)
  tiny.model.dtype = "bfloat16"
  b16, state = _losses(train.Experiment(tiny), batches)
  np.testing.assert_allclose(b16, f32, rtol=2e-2)     # bf16 has 8 mantissa bits; CTC sums ~50 frame terms
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  assert all(x.dtype != jnp.bfloat16 for x in jax.tree.leaves(state.opt_state))


def _dot_dtypes(jaxpr, out):
  for e in jaxpr.eqns:
    if e.primitive.name == "dot_general":
      (lhs, rhs), ((contract, _), _) = e.invars, e.params["dimension_numbers"]
      out.append((str(lhs.aval.dtype), str(rhs.aval.dtype), tuple(lhs.aval.shape[i] for i in contract)))
    for p in e.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          _dot_dtypes(inner, out)
  return out


def test_bf16_train_step_has_no_fp64_and_no_upcast_matmuls(tiny):
  tiny.model.dtype = "bfloat16"
  exp = train.Experiment(tiny)
  jaxpr = jax.make_jaxpr(exp.train_step)(exp.abstract_state(), exp.example_batch(8, 256))
  assert "f64" not in str(jaxpr)
  dots = _dot_dtypes(jaxpr.jaxpr, [])
  mixed = [d for d in dots if d[0] != d[1]]
  assert not mixed, f"matmuls with an up-cast operand: {mixed}"
  bf16 = [d for d in dots if d[0] == "bfloat16"]
  f32 = [d for d in dots if d[0] == "float32"]
  assert len(bf16) >= 40           # day layers, GRU projections and recurrences, heads: forward and backward
  # the fp32 ones are CTC's (policy: log-softmax/CTC in fp32): as many as in the loss alone
  b, p, c = 8, 61, tiny.model.n_classes
  outputs = (jnp.zeros((b, p, c)), jnp.zeros((b, p, c)), jnp.zeros((b, p, 112)))
  loss_only = jax.make_jaxpr(jax.grad(lambda o: losses.decoder_loss(
      o, jnp.full((b,), p), jnp.ones((b, 64), jnp.int32), jnp.full((b,), 5), jnp.ones(b), noisy_weight=0.2,
      noise_l2_weight=0.0)[0]))(outputs)
  ctc_dots = _dot_dtypes(loss_only.jaxpr, [])
  assert len(f32) == len(ctc_dots) and all(d[0] == "float32" for d in ctc_dots)
