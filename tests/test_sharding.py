"""Model-parallel sharding of the noise GRU, mesh-independence of the loss, bf16 policy, jaxpr hygiene."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jaxpr_eqns, scan_carries, tiny_config
from flax import linen as nn
from jax.sharding import PartitionSpec as P
from test_encoders import tiny_encoder
from test_train import _batches, _updates, assert_same_updates, live_lr

from b2t_jax import experiment, losses
from b2t_jax.models import create_model
from b2t_jax.models.decoders import model_hparams
from b2t_jax.sharding import create_mesh


def test_noise_gru_kernels_are_split_over_model_axis(tiny):
  exp = experiment.Experiment(tiny, mesh=create_mesh((4, 2)))
  ps = exp.param_shardings
  layer = ps["noise_model"]["gru"]["layer_0"]
  assert layer["w_ih"].spec == P(None, None, "model") and layer["cell"]["w_hh"].spec == P(None, None, "model")
  assert ps["noise_model"]["gru"]["h0"].spec == P("model")
  assert ps["clean_model"]["gru"]["layer_0"]["cell"]["w_hh"].spec == P(None, None, None)
  assert ps["clean_model"]["frontend"]["day_weights"].spec == P(None, None, None)  # named (days, ...), replicated
  state = exp.init_state()
  w_hh = state.params["noise_model"]["gru"]["layer_1"]["cell"]["w_hh"]
  assert w_hh.addressable_shards[0].data.shape == (112, 3, 56)  # half of the hidden axis per device
  adamw = state.opt_state.inner_state[1].inner_states["main"].inner_state[0]  # inside apply_if_finite, the clip
  mu = adamw.mu["noise_model"]["gru"]["layer_1"]["cell"]["w_hh"]
  assert mu.sharding.spec == P(None, None, "model")  # Adam moments follow their params


@pytest.mark.slow
@pytest.mark.isolated  # a (4, 2) mesh: collectives inside the GRU's loops (conftest.py)
@pytest.mark.parametrize("shape", [(4, 2), (1, 8)], ids=["4x2", "1x8"])
def test_same_updates_on_every_mesh_shape(tiny, shape):
  """Three steps at the peak LR on (8, 1) and on `shape`: the same losses and parameter updates (the noise GRU's
  hidden axis is split over 'model' on `shape`). One test per shape: each runs in its own child process, so a
  stalled run (conftest.py) repeats one mesh, not both."""
  live_lr(tiny)
  batches = _batches(tiny, 3)
  ref, split = (_updates(experiment.Experiment(tiny, mesh=create_mesh(m)), batches) for m in [(8, 1), shape])
  np.testing.assert_allclose(split[0], ref[0], rtol=2e-5)  # fp32 round-off from different reduction orders only
  assert_same_updates(ref[1], split[1])


@pytest.mark.slow
def test_bf16_steps_match_fp32_and_keep_fp32_state(tiny):
  """Three real steps at the peak LR: bf16 compute moves every parameter as fp32 does."""
  live_lr(tiny)
  batches = _batches(tiny, 3)
  f32, d32, _ = _updates(experiment.Experiment(tiny), batches)
  tiny.model.dtype = "bfloat16"
  b16, d16, state = _updates(experiment.Experiment(tiny), batches)
  np.testing.assert_allclose(b16, f32, rtol=2e-2)  # bf16 has 8 mantissa bits; CTC sums ~50 frame terms
  # Per leaf, |update_bf16 - update_fp32| / |update_fp32| (L2 norms): bf16 rounds each matmul operand by up to
  # 2^-9 = 0.2% and Adam passes such relative errors through to the update (measured: at most 0.6%); a gradient
  # term lost or mis-scaled in the bf16 path moves a leaf's update by tens of percent.
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(d32)[0], jax.tree.leaves(d16)):
    assert np.linalg.norm(a) > 1e-3, jax.tree_util.keystr(path)  # the leaf moved
    assert np.linalg.norm(b - a) <= 2e-2 * np.linalg.norm(a), jax.tree_util.keystr(path)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  assert all(x.dtype != jnp.bfloat16 for x in jax.tree.leaves(state.opt_state))


def test_bf16_forward_keeps_the_gru_carry_fp32():
  """SPEC §4: bf16 matmul inputs, but the recurrent state every GRU scan carries from step to step is fp32."""
  tiny = tiny_config()
  tiny.model.dtype = "bfloat16"
  model = create_model(tiny)
  x = jnp.zeros((2, 40, model_hparams(tiny).n_input_features), jnp.float32)
  day = jnp.zeros((2,), jnp.int32)
  params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), x, day)["params"]))
  jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, x, day, mode="full", grl_lambda=0.5))(params)
  carries = scan_carries(jaxpr.jaxpr)
  hidden = {tiny.model.hidden, tiny.model.patch_size * x.shape[-1]}
  states = [a for a in carries if a.ndim == 2 and a.shape[0] == 2 and a.shape[1] in hidden]
  n_layers = tiny.model.noise_layers + tiny.model.clean_layers + tiny.model.noisy_layers
  assert len(states) == n_layers, carries
  assert all(a.dtype == jnp.float32 for a in carries if jnp.issubdtype(a.dtype, jnp.floating)), carries


def _dot_dtypes(jaxpr, out):
  for e in jaxpr_eqns(jaxpr):
    if e.primitive.name == "dot_general":
      (lhs, rhs), ((contract, _), _) = e.invars, e.params["dimension_numbers"]
      out.append((str(lhs.aval.dtype), str(rhs.aval.dtype), tuple(lhs.aval.shape[i] for i in contract)))
  return out


def test_bf16_train_step_has_no_fp64_and_no_upcast_matmuls(tiny):
  tiny.model.dtype = "bfloat16"
  exp = experiment.Experiment(tiny)
  jaxpr = jax.make_jaxpr(exp.train_step)(exp.abstract_state(), exp.example_batch(8, 256))
  assert "f64" not in str(jaxpr)
  dots = _dot_dtypes(jaxpr.jaxpr, [])
  mixed = [d for d in dots if d[0] != d[1]]
  assert not mixed, f"matmuls with an up-cast operand: {mixed}"
  bf16 = [d for d in dots if d[0] == "bfloat16"]
  f32 = [d for d in dots if d[0] == "float32"]
  assert len(bf16) >= 40  # day layers, GRU projections and recurrences, heads: forward and backward
  # the fp32 ones are CTC's (policy: log-softmax/CTC in fp32): as many as in the loss alone
  b, p, c = 8, 61, tiny.model.n_classes
  outputs = {"logits": jnp.zeros((b, p, c)), "noisy_logits": jnp.zeros((b, p, c)), "noise": jnp.zeros((b, p, 112))}
  loss_only = jax.make_jaxpr(
    jax.grad(
      lambda o: losses.decoder_loss(
        o,
        jnp.full((b,), p),
        jnp.ones((b, 64), jnp.int32),
        jnp.full((b,), 5),
        jnp.ones(b),
        noisy_weight=0.2,
        noise_l2_weight=0.0,
      )[0]
    )
  )(outputs)
  ctc_dots = _dot_dtypes(loss_only.jaxpr, [])
  assert len(f32) == len(ctc_dots) and all(d[0] == "float32" for d in ctc_dots)


def test_state_shardings_follow_each_parameters_logical_axes():
  """The optimizer state is initialised from boxed params, so each Adam moment carries its parameter's axis names
  and gets the parameter's sharding; unboxing gives the same tree (and group labels) as initialising unboxed."""
  from b2t_jax import optim

  exp = experiment.Experiment(tiny_config(""), mesh=create_mesh((4, 2)))
  boxed = jax.eval_shape(exp._create_boxed_state)
  unboxed = nn.unbox(boxed)
  assert jax.tree.structure(unboxed.opt_state) == jax.tree.structure(jax.eval_shape(exp.tx.init, unboxed.params))
  assert nn.unbox(optim.param_groups(boxed.params)) == optim.param_groups(unboxed.params)
  assert nn.unbox(optim.decay_mask(boxed.params)) == optim.decay_mask(unboxed.params)
  assert "day" in jax.tree.leaves(optim.param_groups(boxed.params))
  by_path = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(exp.param_shardings)}
  groups = exp.state_shardings.opt_state.inner_state[1].inner_states
  checked = 0
  for adam in (groups["main"].inner_state[0], groups["day"].inner_state[0]):
    for moments in (adam.mu, adam.nu):
      for path, s in jax.tree_util.tree_leaves_with_path(moments):
        assert s == by_path[jax.tree_util.keystr(path)], jax.tree_util.keystr(path)
        checked += 1
  assert checked == 2 * len(by_path)  # every parameter has both moments, in its own group
  assert any(s.spec == P(None, None, "model") for s in by_path.values())
  # the per-day step counts are small and replicated
  assert all(s.spec == P() for s in jax.tree.leaves(groups["day"].inner_state[0].count))


@pytest.mark.slow
@pytest.mark.isolated  # a (4, 2) mesh: collectives inside the GRU's loops (conftest.py)
def test_fsdp_splits_params_and_moments_over_data_and_trains_as_replicated(tiny):
  live_lr(tiny)  # three steps at the peak LR: every parameter moves
  batches = _batches(tiny, 3)
  replicated, d_rep, _ = _updates(experiment.Experiment(tiny, mesh=create_mesh((4, 2))), batches)
  tiny.fsdp, tiny.fsdp_min_size = True, 512
  exp = experiment.Experiment(tiny, mesh=create_mesh((4, 2)))
  ps = exp.param_shardings
  w_hh = ps["noise_model"]["gru"]["layer_0"]["cell"]["w_hh"]  # (112, 3, 112): hidden on 'model', input on 'data'
  assert w_hh.spec == P("data", None, "model")
  # (45 days, 8, 8): 45 does not divide over 4 devices, so the first of the largest dividing axes takes 'data'.
  assert ps["clean_model"]["frontend"]["day_weights"].spec == P(None, "data", None)
  assert ps["clean_model"]["gru"]["layer_0"]["cell"]["b_hh"].spec == P(None, None)  # 48 elements < 512
  assert ps["noise_model"]["gru"]["h0"].spec == P("model")  # below fsdp_min_size
  fsdp, d_fsdp, s_fsdp = _updates(exp, batches)
  # Same math; XLA's all-gathers and reduce-scatters change only fp32 reduction orders.
  np.testing.assert_allclose(fsdp, replicated, rtol=2e-5)
  assert_same_updates(d_rep, d_fsdp)
  mu = s_fsdp.opt_state.inner_state[1].inner_states["main"].inner_state[0].mu
  moment = mu["noise_model"]["gru"]["layer_0"]["cell"]["w_hh"]
  assert moment.sharding.spec == P("data", None, "model")
  assert moment.addressable_shards[0].data.shape == (28, 3, 56)  # an eighth of the moment per device


@pytest.mark.slow
@pytest.mark.isolated  # a (4, 2) mesh: collectives inside the GRU's loops (conftest.py)
@pytest.mark.parametrize("encoder", ["transformer", "mamba2"])
def test_every_encoder_updates_alike_on_one_device_and_on_the_meshes(prepared_dir, encoder):
  """Three steps at the peak LR of a tiny decoder of each encoder, with an intermediate CTC head: one device and
  (4, 2) with fsdp (the batch split 4 ways, the encoder's weights over the model axis and fsdp over the data axis:
  every collective a mesh adds) give the same losses and parameter updates. The GRU's (8, 1) leg is
  test_same_updates_on_every_mesh_shape."""
  c = live_lr(tiny_encoder(encoder, "gru", intermediate=(0,)))
  c.data.data_dir, c.fsdp_min_size = prepared_dir, 256
  batches = _batches(c, 3)
  one = _updates(experiment.Experiment(c, mesh=create_mesh((1, 1), jax.devices()[:1])), batches)
  c.fsdp = True
  exp = experiment.Experiment(c, mesh=create_mesh((4, 2)))
  assert any("data" in s.spec for s in jax.tree.leaves(exp.param_shardings))  # fsdp split some parameter
  split = _updates(exp, batches)
  np.testing.assert_allclose(split[0], one[0], rtol=2e-5)
  assert_same_updates(one[1], split[1])
