"""The causal transformer stack: causality, window, streaming = whole, RoPE past the trained length, bf16, an
independent NumPy reference, dropout, interlayer and the FLOP count."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from b2t_jax.models import transformer
from b2t_jax.models.transformer import TransformerStack, check_config, default_config, stack_flops

B, D_IN, D_OUT, P = 2, 7, 5, 12  # batch, input and output widths, the usual sequence length
TINY = {"d_model": 16, "n_heads": 2, "d_ff": 24, "max_len": 64, "attention_dropout": 0.0}


def _model(window: int = 0, n_layers: int = 2, dtype=jnp.float32, **kw) -> TransformerStack:
  return TransformerStack(n_layers, D_OUT, kw.pop("dropout_rate", 0.0), dtype, **{**TINY, "window": window, **kw})


@functools.cache
def _params(n_layers: int = 2) -> dict:
  """Random weights in the module's parameter tree (its shapes from `init` traced on 4 patches: the window and
  max_len are not parameters). Kernels N(0, 1/fan_in); norm scales 1 + N(0, 0.3^2) and biases N(0, 0.3^2), off
  their init values so that the reference checks them. (Drawn in NumPy: compiling `init` costs seconds.)"""
  shapes = jax.eval_shape(
    lambda: _model(n_layers=n_layers).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, D_IN)), deterministic=True)
  )
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name, shape = jax.tree_util.keystr(path), leaf.shape
    if len(shape) == 1:
      return (float(name.endswith("['scale']")) + 0.3 * rng.standard_normal(shape)).astype(np.float32)
    fan_in = shape[0] * shape[1] if name.endswith("['w_o']") else shape[0]
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes)["params"])


@functools.cache
def _whole_fn(window: int, n_layers: int = 2, dtype=jnp.float32):
  model = _model(window, n_layers, dtype)
  return jax.jit(lambda p, x: model.apply({"params": p}, x, deterministic=True))


def _whole(x, window: int = 0, n_layers: int = 2) -> np.ndarray:
  return np.asarray(_whole_fn(window, n_layers)(_params(n_layers), jnp.asarray(x)))


@functools.cache
def _step_fn(window: int, max_len: int = TINY["max_len"]):
  model = _model(window, max_len=max_len)
  return model, jax.jit(lambda p, x, v, c: model.apply({"params": p}, x, v, c, method=model.step))


def _stream(x: np.ndarray, valid: np.ndarray, chunk: int, window: int, max_len: int = TINY["max_len"]):
  """Feeds slots x (B, S_total, d_in) with `valid` (S_total,) through `step` in chunks of `chunk` slots (the tail
  padded with invalid slots) -> (outputs of the valid slots (B, n_valid, d_out), final carry)."""
  model, step = _step_fn(window, max_len)
  params = _params()
  pad = -len(valid) % chunk
  x = np.concatenate([x, np.full((B, pad, D_IN), 7.0, np.float32)], axis=1)
  valid = np.concatenate([valid, np.zeros(pad, bool)])
  carry = model.apply({"params": params}, B, method=model.initial_carry)
  outs = []
  for s in range(0, len(valid), chunk):
    out, carry = step(params, jnp.asarray(x[:, s : s + chunk]), jnp.asarray(valid[s : s + chunk]), carry)
    outs.append(np.asarray(out))
  return np.concatenate(outs, axis=1)[:, valid], carry


def _inputs(p: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((B, p, D_IN)).astype(np.float32)


def test_causal_future_changes_nothing_present_does():
  x, t = _inputs(P), 4
  y = _whole(x)
  future = x.copy()
  future[:, t + 1 :] = _inputs(P, seed=1)[:, t + 1 :]
  np.testing.assert_array_equal(_whole(future)[:, : t + 1], y[:, : t + 1])
  present = x.copy()
  present[:, t] += 1.0
  y_present = _whole(present)
  np.testing.assert_array_equal(y_present[:, :t], y[:, :t])
  assert np.abs(y_present[:, t] - y[:, t]).min() > 1e-4


@pytest.mark.parametrize("n_layers", [1, 2])
def test_window_bounds_the_receptive_field(n_layers):
  """Each layer looks back window - 1 positions: n_layers (window - 1) in all."""
  window, t = 3, P - 1
  reach = n_layers * (window - 1)  # position t reads positions t - reach .. t
  x = _inputs(P)
  y = _whole(x, window, n_layers)[:, t]
  old = x.copy()
  old[:, : t - reach] = _inputs(P, seed=1)[:, : t - reach]
  np.testing.assert_array_equal(_whole(old, window, n_layers)[:, t], y)
  edge = x.copy()
  edge[:, t - reach] += 1.0
  assert np.abs(_whole(edge, window, n_layers)[:, t] - y).min() > 1e-6


def _interleaved(p: int, every: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """A sequence of p patches with an invalid slot (garbage input) after every `every` valid ones:
  (sequence (B, p, d_in), slots (B, S_total, d_in), valid (S_total,))."""
  x = _inputs(p, seed)
  slots, valid = [], []
  for i in range(p):
    slots.append(x[:, i])
    valid.append(True)
    if i % every == every - 1:
      slots.append(np.full((B, D_IN), 100.0 * (i + 1), np.float32))
      valid.append(False)
  return x, np.stack(slots, axis=1), np.asarray(valid)


@pytest.mark.parametrize("window", [0, 3])
def test_step_equals_whole_with_invalid_slots(window):
  x, slots, valid = _interleaved(P, every=2)
  want = _whole(x, window)
  for chunk in (1, 3, 4):
    got, carry = _stream(slots, valid, chunk, window)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0, err_msg=f"chunk {chunk}")
    assert int(carry["n"]) == P
  # A chunk of invalid slots leaves the carry exactly as it was.
  _, step = _step_fn(window)
  _, carry = _stream(slots, valid, 4, window)
  _, same = step(_params(), jnp.asarray(slots[:, :4] + 3.0), jnp.zeros(4, bool), carry)
  jax.tree.map(np.testing.assert_array_equal, same, carry)


def test_longer_than_initialised_and_past_max_len():
  """Params shaped on 4 patches and used on 12 run on 40 (RoPE: no position table) as the NumPy reference does;
  streaming equals whole there. Past max_len, a window = 0 stream equals the whole call with window = max_len
  (the documented behaviour)."""
  x = _inputs(40, seed=3)
  want = _whole(x, 3)
  assert np.isfinite(want).all() and np.abs(want).max() > 0.1
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), _params())
  np.testing.assert_allclose(want, numpy_stack(x, params, 3, _model().rope_base), atol=1e-5, rtol=0)
  got, _ = _stream(x, np.ones(40, bool), 4, 3)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  got, carry = _stream(x, np.ones(40, bool), 4, 0, max_len=8)
  np.testing.assert_allclose(got, _whole(x, 8), atol=2e-5, rtol=0)
  assert carry["k"].shape[2] == 8 and sorted(np.asarray(carry["slot_pos"])) == list(range(32, 40))


def _primitives(jaxpr) -> set[tuple[str, tuple[str, ...], str]]:
  """(primitive, operand dtypes, precision) of every equation in a jaxpr and its sub-jaxprs."""
  found = set()
  for eqn in jaxpr.eqns:
    dtypes = tuple(str(v.aval.dtype) for v in eqn.invars)
    found.add((eqn.primitive.name, dtypes, str(eqn.params.get("precision"))))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found |= _primitives(sub)
  return found


# Where bf16 would lose accuracy: norms (square, mean, rsqrt), softmax (max, exp, sum, divide), RoPE, SiLU.
_FP32_ONLY = {"exp", "log", "logistic", "rsqrt", "sqrt", "sin", "cos", "reduce_sum", "reduce_max", "div", "square"}


def test_bf16_output_params_and_numerics():
  x = _inputs(P, seed=4)
  model = _model(3, dtype=jnp.bfloat16)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, D_IN)), deterministic=True))
  assert {a.dtype for a in jax.tree.leaves(nn.unbox(params))} == {jnp.dtype(jnp.float32)}
  y16 = _whole_fn(3, 2, jnp.bfloat16)(_params(), jnp.asarray(x))
  assert y16.dtype == jnp.bfloat16
  # bf16 rounds each matmul operand to 8 significant bits (relative error <= u = 2^-9). The output is downstream
  # of 10 such roundings (embed; per block q/k/v, softmax weights, values, W_o, W_in, W_down; output) whose errors,
  # each O(u) of the activations' scale, add at most linearly: 10 u ~ 2% of max |y|. (Measured: 0.7-1.3%.)
  y32 = _whole(x, 3)
  err = np.abs(np.asarray(y16, np.float32) - y32).max()
  assert err <= 10 * 2.0**-9 * np.abs(y32).max(), err
  # Forward and backward: every dot_general takes two bf16 operands (no up-cast), except the attention kernel's
  # backward through its fp32 logits, which names the BF16_BF16_F32 algorithm (operands rounded to bf16, fp32
  # accumulation: jax's fix for jax-ml/jax#24047); norms, softmax, RoPE and SiLU run on fp32 only.
  loss = lambda p, x: model.apply({"params": p}, x, deterministic=True).astype(jnp.float32).sum()
  found = _primitives(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(_params(), jnp.asarray(x, jnp.bfloat16)).jaxpr)
  dots = {(d, prec) for name, d, prec in found if name == "dot_general"}
  assert {d for d, prec in dots if "BF16_BF16_F32" not in prec} == {("bfloat16", "bfloat16")}, dots
  assert {d for d, prec in dots if "BF16_BF16_F32" in prec} <= {("bfloat16", "bfloat16"), ("float32", "bfloat16")}
  delicate = {(name, d) for name, d, _ in found if name in _FP32_ONLY}
  assert {"exp", "rsqrt", "logistic", "sin"} <= {name for name, _ in delicate}
  assert {t for _, d in delicate for t in d} == {"float32"}, delicate


def _np_rms(h, scale):
  return h / np.sqrt((h * h).mean(-1, keepdims=True) + transformer._NORM_EPS) * scale


def _np_rope(x, base):
  """x (B, P, N, Hd): pairs (i, i + Hd/2) as complex numbers, multiplied by exp(i * pos * base^(-2i/Hd))."""
  half = x.shape[-1] // 2
  theta = np.arange(x.shape[1])[:, None] * base ** (-2.0 * np.arange(half) / x.shape[-1])
  z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * theta)[None, :, None, :]
  return np.concatenate([z.real, z.imag], axis=-1)


def numpy_stack(x, p, window: int, base: float):
  """The stack written out in float64: embed, pre-norm blocks (attention by explicit loops over positions),
  final norm, output Dense."""
  h = x.astype(np.float64) @ p["embed"]["kernel"] + p["embed"]["bias"]
  n_pos = h.shape[1]
  for i in range(len([k for k in p if k.startswith("block_")])):
    blk = p[f"block_{i}"]
    qkv = np.einsum("bpd,dcnk->bpcnk", _np_rms(h, blk["attn_norm"]["scale"]), blk["w_qkv"])
    q, k, v = _np_rope(qkv[:, :, 0], base), _np_rope(qkv[:, :, 1], base), qkv[:, :, 2]
    att = np.zeros_like(q)
    for b in range(h.shape[0]):
      for n in range(q.shape[2]):
        for t in range(n_pos):
          seen = [s for s in range(n_pos) if s <= t and (window == 0 or s > t - window)]
          logits = np.array([q[b, t, n] @ k[b, s, n] for s in seen]) / np.sqrt(q.shape[-1])
          w = np.exp(logits - logits.max())
          att[b, t, n] = (w / w.sum()) @ v[b, seen, n]
    h = h + np.einsum("bpnk,nkd->bpd", att, blk["w_o"])
    m = _np_rms(h, blk["mlp_norm"]["scale"])
    gate, up = m @ blk["w_in"][:, 0], m @ blk["w_in"][:, 1]
    h = h + (gate / (1.0 + np.exp(-gate)) * up) @ blk["w_down"]
  return _np_rms(h, p["final_norm"]["scale"]) @ p["out"]["kernel"] + p["out"]["bias"]


@pytest.mark.parametrize("window", [0, 3])
def test_matches_numpy_reference(window):
  x = _inputs(P, seed=5)
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), _params(1))
  want = numpy_stack(x, params, window, _model().rope_base)
  np.testing.assert_allclose(_whole(x, window, n_layers=1), want, atol=1e-5, rtol=0)


def test_dropout_sites_and_determinism():
  x = jnp.asarray(_inputs(P))

  @functools.cache
  def compiled(attn: float, mlp: float, deterministic: bool):
    model = _model(attention_dropout=attn, dropout_rate=mlp)
    return jax.jit(lambda p, x, key: model.apply({"params": p}, x, deterministic=deterministic, rngs={"dropout": key}))

  def run(attn: float, mlp: float, deterministic: bool, seed: int = 7):
    return np.asarray(compiled(attn, mlp, deterministic)(_params(), x, jax.random.PRNGKey(seed)))

  base = _whole(x)
  np.testing.assert_array_equal(run(0.5, 0.5, True), base)
  for attn, mlp in ((0.5, 0.0), (0.0, 0.5)):
    dropped = run(attn, mlp, False)
    assert np.abs(dropped - base).max() > 1e-3, (attn, mlp)
    np.testing.assert_array_equal(run(attn, mlp, False), dropped)  # same key, same masks
    assert np.abs(run(attn, mlp, False, seed=8) - dropped).max() > 1e-3


def test_interlayer_sees_every_layer_and_streams():
  x, slots, valid = _interleaved(P, every=3, seed=6)
  seen = []

  def interlayer(i, h):
    seen.append((i, h.shape, h.dtype))  # at trace time: once per layer and call
    return h + 0.5 * (i + 1) * jnp.tanh(h)

  model = _model(3)
  whole = jax.jit(lambda p, x: model.apply({"params": p}, x, deterministic=True, interlayer=interlayer))
  want = np.asarray(whole(_params(), jnp.asarray(x)))
  assert seen == [(0, (B, P, 16), jnp.float32), (1, (B, P, 16), jnp.float32)]
  assert np.abs(want - _whole(x, 3)).max() > 1e-3
  carry = model.apply({"params": _params()}, B, method=model.initial_carry)
  step = jax.jit(lambda p, x, v, c: model.apply({"params": p}, x, v, c, method=model.step, interlayer=interlayer))
  out, _ = step(_params(), jnp.asarray(slots), jnp.asarray(valid), carry)
  np.testing.assert_allclose(np.asarray(out)[:, valid], want, atol=2e-5, rtol=0)


def test_stack_flops_by_hand():
  cfg = ml_collections.ConfigDict({**default_config().to_dict(), "d_model": 8, "d_ff": 12, "window": 2})
  # d_in 5 -> D 8, 3 layers, d_out 3, 4 patches. Spans min(2, t + 1) over t = 0..3: 1 + 2 + 2 + 2 = 7.
  embed = 2 * 5 * 8 * 4  # 320
  projections = (4 * 2 * 8 * 8 + 3 * 2 * 8 * 12) * 4  # q, k, v, o and the SwiGLU's three: (512 + 576) * 4
  attention = 2 * (2 * 8) * 7  # QK^T and AV: 2 D per attended pair
  out = 2 * 8 * 3 * 4  # 192
  assert stack_flops(cfg, 3, 5, 3, 4) == embed + 3 * (projections + attention) + out == 14240
  cfg.window = 0  # spans 1 + 2 + 3 + 4 = 10; no output projection when d_out is None or d_model
  assert stack_flops(cfg, 1, 5, None, 4) == stack_flops(cfg, 1, 5, 8, 4) == 320 + 4352 + 2 * 16 * 10 == 4992


def test_config_errors_name_the_field():
  check_config(default_config())
  for changes, words in (
    ({"n_heads": 3}, r"transformer\.n_heads=3: must divide d_model=640"),
    ({"d_model": 48, "n_heads": 16}, r"transformer\.n_heads=16: .* heads of even width"),
    ({"window": -1}, r"transformer\.window=-1"),
    ({"d_ff": 0}, r"transformer\.d_ff=0: expected a positive integer"),
    ({"rope_base": 1.0}, r"transformer\.rope_base=1\.0"),
    ({"attention_dropout": 1.0}, r"transformer\.attention_dropout=1\.0"),
  ):
    cfg = default_config()
    cfg.update(changes)
    with pytest.raises(ValueError, match=f"^config\\.model\\.{words}"):
      check_config(cfg)
  with pytest.raises(ValueError, match="config.model.transformer.window"):
    jax.eval_shape(lambda: _model(-2).init(jax.random.PRNGKey(0), jnp.zeros((1, 2, D_IN)), deterministic=True))


def test_from_config_builds_the_configured_stack():
  cfg = default_config()
  cfg.update({"d_model": 48, "n_heads": 4, "window": 5})
  stack = TransformerStack.from_config(cfg, 3, 224, 0.2, jnp.bfloat16)
  assert (stack.n_layers, stack.d_out, stack.dropout_rate, stack.dtype) == (3, 224, 0.2, jnp.bfloat16)
  assert {f: getattr(stack, f) for f in cfg} == cfg.to_dict() and stack.cache_len == 5
  cfg.n_heads = 5
  with pytest.raises(ValueError, match=r"config\.model\.transformer\.n_heads=5"):
    TransformerStack.from_config(cfg, 3, 224, 0.2, jnp.bfloat16)
