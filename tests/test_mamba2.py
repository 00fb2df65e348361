"""The Mamba-2 (SSD) stack: chunked = recurrent = a NumPy loop, causality, streaming = whole, bf16, gradients,
FLOP count, initialisation (models/mamba2.py)."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from b2t_jax.models import mamba2
from b2t_jax.models.mamba2 import Mamba2Stack

# Jitted once: the tests compile a handful of small programs instead of dispatching hundreds of ops one by one.
ssd_chunked = jax.jit(mamba2.ssd_chunked, static_argnames="chunk_size")
ssd_recurrent = jax.jit(mamba2.ssd_recurrent)

# SSD problem size: 4 heads in 2 groups (2 heads read each group's B and C), 13 positions.
BATCH, LENGTH, HEADS, HEAD_DIM, GROUPS, STATE = 2, 13, 4, 3, 2, 5


def _ssd_inputs(seed: int = 0, length: int = LENGTH):
  """Random SSD inputs: dt = softplus(normal) up to ~3 and A in -[1, 16] (the init range), so a chunk's summed
  log-decay reaches the hundreds, where exp(cumsum) is delicate; a random initial state."""
  rng = np.random.default_rng(seed)
  f = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  return dict(
    x=f(BATCH, length, HEADS, HEAD_DIM),
    dt=np.log1p(np.exp(f(BATCH, length, HEADS))).astype(np.float32),
    a=-rng.uniform(1.0, 16.0, HEADS).astype(np.float32),
    b=f(BATCH, length, GROUPS, STATE),
    c=f(BATCH, length, GROUPS, STATE),
    d=f(HEADS),
    initial_state=f(BATCH, HEADS, HEAD_DIM, STATE),
  )


def numpy_ssd(x, dt, a, b, c, d, initial_state):
  """The SSD recurrence written out per trial, position and head in float64 (head h reads group h // (H / G))."""
  x, dt, a, b, c, d, s0 = (np.asarray(t, np.float64) for t in (x, dt, a, b, c, d, initial_state))
  per_group = x.shape[2] // b.shape[2]
  y = np.zeros_like(x)
  final = np.zeros_like(s0)
  for i in range(x.shape[0]):
    for h in range(x.shape[2]):
      g = h // per_group
      s = s0[i, h].copy()  # (P, N)
      for t in range(x.shape[1]):
        s = np.exp(dt[i, t, h] * a[h]) * s + dt[i, t, h] * np.outer(x[i, t, h], b[i, t, g])
        y[i, t, h] = s @ c[i, t, g] + d[h] * x[i, t, h]
      final[i, h] = s
  return y, final


# chunk sizes: 1 (a pure scan across chunks), 4 and 5 (do not divide 13: the last chunk is padded), 20 (> L:
# one chunk of 13)
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 20])
def test_chunked_equals_recurrent(chunk_size):
  inputs = _ssd_inputs()
  y_rec, s_rec = ssd_recurrent(**inputs)
  y_chk, s_chk = ssd_chunked(**inputs, chunk_size=chunk_size)
  assert y_chk.shape == (BATCH, LENGTH, HEADS, HEAD_DIM) and y_chk.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y_chk), np.asarray(y_rec), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(s_chk), np.asarray(s_rec), atol=1e-5, rtol=0)


def test_ssd_forms_match_numpy_loop():
  inputs = _ssd_inputs(seed=1)
  want_y, want_s = numpy_ssd(**inputs)
  for got_y, got_s in (ssd_recurrent(**inputs), ssd_chunked(**inputs, chunk_size=4)):
    np.testing.assert_allclose(np.asarray(got_y), want_y, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(got_s), want_s, atol=1e-5, rtol=0)
  # Invalid positions leave the recurrent state as it was: equal to the loop over the valid positions only.
  valid = np.array([True, False, True, True, False] + [True] * (LENGTH - 5))
  got_y, got_s = ssd_recurrent(**inputs, valid=jnp.asarray(valid))
  kept = {k: (v[:, valid] if k in ("x", "dt", "b", "c") else v) for k, v in inputs.items()}
  want_y, want_s = numpy_ssd(**kept)
  np.testing.assert_allclose(np.asarray(got_y)[:, valid], want_y, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(got_s), want_s, atol=1e-5, rtol=0)


def test_ssd_matmuls_ask_for_full_fp32_precision():
  """TPUs (one bf16 pass) and NVIDIA GPUs (TF32) multiply fp32 at reduced precision by default; the CPU this suite
  runs on does not, so the request itself is what can be checked here: every SSD matmul in the lowered program."""
  inputs = _ssd_inputs()
  for form, static in ((mamba2.ssd_chunked, dict(chunk_size=4)), (mamba2.ssd_recurrent, {})):
    text = jax.jit(form, static_argnames=tuple(static)).lower(**inputs, **static).as_text()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert dots and all("precision = [HIGHEST, HIGHEST]" in line for line in dots), form.__name__


def test_chunked_gradients_match_recurrent_and_finite_differences():
  inputs = {k: jnp.asarray(v) for k, v in _ssd_inputs(seed=2, length=7).items()}
  rng = np.random.default_rng(3)
  wy = jnp.asarray(rng.standard_normal((BATCH, 7, HEADS, HEAD_DIM)), jnp.float32)
  ws = jnp.asarray(rng.standard_normal((BATCH, HEADS, HEAD_DIM, STATE)), jnp.float32)

  def loss(form, args):
    y, s = form(**args)
    return jnp.sum(y * wy) + jnp.sum(s * ws)

  chunked = functools.partial(ssd_chunked, chunk_size=3)  # 3 chunks, the last one padded
  g_chk = jax.jit(jax.grad(functools.partial(loss, chunked)))(inputs)
  g_rec = jax.jit(jax.grad(functools.partial(loss, ssd_recurrent)))(inputs)
  for k in inputs:
    scale = float(jnp.max(jnp.abs(g_rec[k])))
    np.testing.assert_allclose(np.asarray(g_chk[k]), np.asarray(g_rec[k]), atol=1e-5 * max(scale, 1.0), err_msg=k)
  # Central differences of the chunked form along a random direction (fp32: step 1e-2 on O(1) inputs, so the
  # rounding error of the difference is ~1e-5 relative while the curvature term is ~1e-4 relative).
  direction = {k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for k, v in inputs.items()}
  direction["dt"] = direction["dt"] * 0.1  # keep dt positive
  eps = 1e-2
  shifted = lambda sign: {k: inputs[k] + sign * eps * direction[k] for k in inputs}
  f = jax.jit(functools.partial(loss, chunked))
  numeric = (f(shifted(1.0)) - f(shifted(-1.0))) / (2 * eps)
  analytic = sum(jnp.sum(g_chk[k] * direction[k]) for k in inputs)
  np.testing.assert_allclose(float(analytic), float(numeric), rtol=2e-3)


# The stack at test size: 16 inner channels in 4 heads of 4, 2 groups, state 3, conv 3 taps, chunks of 4.
TINY = dict(d_model=8, d_state=3, d_conv=3, expand=2, head_dim=4, n_groups=2, chunk_size=4, dt_min=0.001, dt_max=0.1)
D_IN, D_OUT, N_LAYERS = 5, 6, 2


def _stack(dtype=jnp.float32, dropout_rate=0.0, d_out=D_OUT):
  cfg = ml_collections.ConfigDict(TINY)
  return Mamba2Stack.from_config(cfg, N_LAYERS, d_out, dropout_rate, dtype)


@functools.cache
def _boxed_params():
  """The tiny stack's initial parameters, boxed with their logical axes (dtype does not change them). An "rbg" key:
  XLA:CPU compiles its generator in a fraction of threefry's time, and the distributions are the same."""
  init = lambda key: _stack().init(key, jnp.zeros((1, 4, D_IN), jnp.float32), deterministic=True)["params"]
  return jax.jit(init)(jax.random.key(0, impl="rbg"))


def _params():
  return nn.unbox(_boxed_params())


def _interlayer(i, h):
  """A position-wise residual-stream edit (what intermediate CTC does), different per layer."""
  return h + 0.1 * (i + 1) * jnp.tanh(h)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _whole(params, x, dtype=jnp.float32):
  return _stack(dtype).apply({"params": params}, x, deterministic=True, interlayer=_interlayer)


def test_stack_is_causal():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 11, D_IN)).astype(np.float32)
  params = _params()
  base = np.asarray(_whole(params, x))
  assert base.shape == (2, 11, D_OUT) and base.dtype == np.float32
  for t in (0, 5, 8, 10):  # 5: inside the second chunk; 8: a chunk's first position; 10: the padded last chunk
    changed = x.copy()
    changed[:, t:] += rng.standard_normal(changed[:, t:].shape).astype(np.float32)
    out = np.asarray(_whole(params, changed))
    np.testing.assert_array_equal(out[:, :t], base[:, :t])  # the past is untouched, exactly
    assert np.all(np.abs(out[:, t] - base[:, t]).max(axis=-1) > 1e-3), t  # the present sees its own input


@functools.partial(jax.jit, static_argnames=("dtype",))
def _step(params, x, valid, carry, dtype=jnp.float32):
  return _stack(dtype).apply({"params": params}, x, valid, carry, interlayer=_interlayer, method=Mamba2Stack.step)


@pytest.mark.parametrize("slots", [1, 3, 4])
def test_step_equals_whole_with_invalid_slots(slots):
  rng = np.random.default_rng(slots)
  length = 11
  x = rng.standard_normal((2, length, D_IN)).astype(np.float32)
  params = _params()
  want = np.asarray(_whole(params, x))
  carry = _stack().apply({"params": params}, 2, method=Mamba2Stack.initial_carry)
  got, pos = [], 0
  while pos < length:
    # Each call mixes valid slots (the next positions) with invalid ones holding garbage, wherever they fall.
    valid = rng.random(slots) < 0.6
    if slots > 1:
      valid[rng.integers(slots)] = False
    valid[: max(0, slots - (length - pos))] = False  # never run past the end
    n_valid = int(valid.sum())
    chunk = (100.0 * rng.standard_normal((2, slots, D_IN))).astype(np.float32)
    chunk[:, valid] = x[:, pos : pos + n_valid]
    out, carry = _step(params, chunk, jnp.asarray(valid), carry)
    got.append(np.asarray(out)[:, valid])
    pos += n_valid
  np.testing.assert_allclose(np.concatenate(got, axis=1), want, atol=2e-5, rtol=0)
  # A call whose slots are all invalid hands the carry back exactly as it was.
  _, same = _step(params, 100.0 * x[:, :slots], jnp.zeros(slots, bool), carry)
  jax.tree.map(np.testing.assert_array_equal, same, carry)


def test_bf16_compute_keeps_fp32_params_and_stays_close():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((2, 11, D_IN)), jnp.float32)
  # A bf16 stack declares fp32 params (their shapes and dtypes, from the abstract init: nothing compiled).
  init = lambda: _stack(jnp.bfloat16).init(jax.random.PRNGKey(0), x, deterministic=True)["params"]
  assert {leaf.dtype for leaf in jax.tree.leaves(jax.eval_shape(init))} == {jnp.dtype(jnp.float32)}
  params = _params()  # the same values as a bf16 stack's init: the compute dtype does not enter the initialisers
  got = _whole(params, x, dtype=jnp.bfloat16)
  want = np.asarray(_whole(params, x))
  assert got.dtype == jnp.bfloat16
  # bf16's unit roundoff is 2^-8 (8 significant bits). The final cast alone costs up to one roundoff of the output
  # scale (|want| <= ~1.5 here); rounding the inputs of the output Dense and of each block's projections adds a few
  # more. The bound is 8 roundoffs at the output's scale (0.047 here); measured 0.010.
  err = np.abs(np.asarray(got, np.float32) - want).max()
  assert err <= 8 * 2.0**-8 * np.abs(want).max(), err
  assert err > 0.0  # the bf16 path was taken


def test_stack_flops_hand_count():
  cfg = ml_collections.ConfigDict(TINY)
  # P = 10 patches: chunk q = 4, 3 chunks (the last one padded). d_inner 16, 4 heads of 4, 2 groups, state 3.
  input_dense = 2 * 5 * 8 * 10
  per_position = (
    2 * 8 * (16 + 16)  # z, x
    + 2 * 8 * (2 * 2 * 3)  # B, C: 2 groups x state 3 each
    + 2 * 8 * 4  # dt, one per head
    + 2 * 3 * (16 + 2 * 2 * 3)  # conv: 3 taps over x, B, C
    + 2 * 16 * 8  # out-projection
  )
  per_chunk = (
    2 * 2 * (4 * 4 * 3)  # C B^T: per group (4 x 3) (3 x 4)
    + 2 * 4 * (4 * 4 * 4)  # scores x (dt x): per head (4 x 4) (4 x 4)
    + 2 * 4 * (4 * 4 * 3)  # chunk states: per head (4 x 4) (4 x 3)
    + 2 * 4 * (4 * 3 * 4)  # entry-state read-out: per head (4 x 3) (3 x 4)
  )
  output_dense = 2 * 8 * 6 * 10
  assert per_position == 1192 and per_chunk == 1472
  want = input_dense + 2 * (10 * per_position + 3 * per_chunk) + output_dense
  assert mamba2.stack_flops(cfg, N_LAYERS, D_IN, D_OUT, 10) == want == 34432
  # Shorter than a chunk: one chunk of q = 3; no output Dense when d_out is the model width.
  short_chunk = 2 * 2 * (3 * 3 * 3) + 2 * 4 * (3 * 3 * 4) + 2 * 4 * (3 * 4 * 3) * 2
  want = 2 * 5 * 8 * 3 + 2 * (3 * per_position + short_chunk)
  assert mamba2.stack_flops(cfg, N_LAYERS, D_IN, None, 3) == mamba2.stack_flops(cfg, N_LAYERS, D_IN, 8, 3) == want


def test_init_follows_reference_and_declares_axes():
  boxed = _boxed_params()
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert all(isinstance(v, nn.Partitioned) and len(v.names) == v.value.ndim for v in leaves)
  p = nn.unbox(boxed)
  assert set(p) == {"in_proj", "layer_0", "layer_1", "final_norm", "out_proj"}
  layer = p["layer_0"]
  a = np.exp(np.asarray(layer["A_log"]))
  assert a.shape == (4,) and np.all((a >= 1.0) & (a <= 16.0))
  dt = np.log1p(np.exp(np.asarray(layer["dt_bias"])))  # softplus
  np.testing.assert_array_less(TINY["dt_min"] * (1 - 1e-5), dt)
  np.testing.assert_array_less(dt, TINY["dt_max"] * (1 + 1e-5))
  np.testing.assert_array_equal(layer["D"], np.ones(4))
  np.testing.assert_array_equal(layer["gate_norm"]["scale"], np.ones(16))
  conv_bound = 1 / np.sqrt(TINY["d_conv"])
  assert np.abs(np.asarray(layer["conv_x"]["kernel"])).max() <= conv_bound
  # out-projection: U(+-1/sqrt(fan_in)) scaled by 1/sqrt(n_layers)
  assert np.abs(np.asarray(layer["out"]["kernel"])).max() <= 1 / np.sqrt(16) / np.sqrt(N_LAYERS)
  # One different layer of validation: the heads must split the inner width.
  with pytest.raises(ValueError, match="config.model.mamba2.head_dim=5"):
    mamba2.validate_config(ml_collections.ConfigDict(dict(TINY, head_dim=5)))
