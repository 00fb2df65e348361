"""A Mamba-2 (SSD) encoder stack (Dao & Gu 2024, "Transformers are SSMs", arXiv:2405.21060).

Stack: input Dense(d_in -> d_model); `n_layers` pre-norm residual blocks; a final RMSNorm; an optional output
Dense(d_model -> d_out). One block (the paper's Mamba-2 block, no MLP):

  u = RMSNorm(h)
  z, x, B, C, dt = in-projections of u          (z, x: d_inner; B, C: n_groups x d_state; dt: n_heads)
  x, B, C = SiLU(causal depthwise conv1d over time, kernel d_conv)
  y = SSD(x, dt = softplus(dt + dt_bias), A = -exp(A_log), B, C) + D * x      (per head, A and D scalars)
  h = h + Dropout(out_proj(RMSNorm_grouped(y * SiLU(z))))

The SSD recurrence per head (state s: head_dim x d_state, one per head; B, C shared by the heads of a group):
  s_t = exp(dt_t A) s_{t-1} + dt_t x_t B_t^T,   y_t = s_t C_t + D x_t.
Two forms compute it:
- `ssd_chunked` (training, whole trials): positions are cut into chunks of `chunk_size`; within a chunk the
  outputs are masked (Q x Q) matmuls (the "dual", attention-like form), and one state per chunk is carried by
  a scan across chunks. This is the form whose work is matmuls (the MXU's).
- `ssd_recurrent` (streaming): the recurrence one position at a time, with a `valid` mask that leaves the state
  unchanged at invalid slots.
All SSM arithmetic (conv, softplus, exp of cumulative sums, SSD matmuls, states) is float32 whatever `dtype`
is; `dtype` applies to the inputs of the projections only.

Initialisation follows the reference implementation (state-spaces/mamba, `mamba_ssm/modules/mamba2.py` and
`models/mixer_seq_simple.py:_init_weights`): A_log = log U[1, 16]; dt_bias = softplus^-1(dt) with dt
log-uniform in [dt_min, dt_max] (floored at 1e-4); D = 1; conv weights and biases PyTorch's Conv1d default
U(+-1/sqrt(d_conv)); projections PyTorch's Linear default U(+-1/sqrt(fan_in)) without bias, out_proj further
scaled by 1/sqrt(n_layers); norms 1, eps 1e-5. The stack's own input/output Dense layers (not in the
reference) use the Linear default with zero bias, as the reference does for every Linear bias.

Parameters (their names decide weight decay in `optim.decay_mask`: `kernel`s decay, the rest do not; the
reference marks A_log, D and dt_bias `_no_weight_decay`):
  in_proj/{kernel,bias}, layer_{i}/{norm/scale, in_zx/kernel, in_bc/kernel, in_dt/kernel, conv_x/{kernel,bias},
  conv_bc/{kernel,bias}, dt_bias, A_log, D, gate_norm/scale, out/kernel}, final_norm/scale, out_proj/{kernel,bias}.
Logical axis names: "ssm_in" (the stack's input width), "ssm_embed" (d_model), "ssm_inner" (d_inner = expand *
d_model, the widest), "ssm_heads", "ssm_groups", "ssm_state" (d_state), "ssm_conv" (conv taps), "ssm_out" (d_out).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from b2t_jax.models.cell import matmul

__all__ = [
  "Mamba2Stack",
  "causal_conv",
  "causal_conv_steps",
  "default_config",
  "ssd_chunked",
  "ssd_recurrent",
  "stack_flops",
  "validate_config",
]

# Fixed by the reference implementation (state-spaces/mamba, mamba_ssm/modules/mamba2.py), not knobs.
A_INIT_RANGE = (1.0, 16.0)  # A = -U[1, 16] per head
DT_INIT_FLOOR = 1e-4  # the initial dt is floored here before inverting the softplus
NORM_EPS = 1e-5  # RMSNorm epsilon of the block norms, the gated norm and the final norm

Interlayer = Callable[[int, jax.Array], jax.Array]


def default_config() -> ml_collections.ConfigDict:
  """`config.model.mamba2`: the Mamba-2 stack's hyper-parameters (n_layers, dropout and dtype come from the model).

  The defaults are the full-size setting (the reference's block values with a width chosen for the parameter
  budget, not tuned): with the baseline's model.n_layers = 5 on the 7168-wide patches the GRUDecoder layout holds
  about 43.6M parameters (11.8M of them day layers): the range of the 44.3M-parameter GRU baseline
  (tests/test_encoders.py checks the count). configs/demo.py sets a demo-size one.
  """
  c = ml_collections.ConfigDict()
  c.d_model = 896  # width of the residual stream (the input Dense maps the patch width to it)
  c.d_state = 128  # N: state size per head (reference default 128)
  c.d_conv = 4  # taps of the causal depthwise conv over (x, B, C) (reference default 4)
  c.expand = 2  # d_inner = expand * d_model (reference default 2)
  c.head_dim = 64  # P: channels per head; n_heads = d_inner / head_dim (reference default 64)
  c.n_groups = 1  # groups of heads sharing B and C; must divide n_heads (reference default 1)
  c.chunk_size = 64  # SSD chunk length (positions); ~6 chunks for a 370-patch trial; shorter inputs use one chunk
  c.dt_min = 0.001  # initial dt = softplus(dt_bias) is log-uniform in [dt_min, dt_max] (reference values)
  c.dt_max = 0.1
  return c


def validate_config(cfg: ml_collections.ConfigDict, where: str = "config.model.mamba2") -> None:
  """Raises ValueError naming the field when the sub-config cannot build a stack."""
  for name in ("d_model", "d_state", "d_conv", "expand", "head_dim", "n_groups", "chunk_size"):
    if int(cfg[name]) < 1:
      raise ValueError(f"{where}.{name}={cfg[name]} must be a positive integer")
  d_inner = cfg.expand * cfg.d_model
  if d_inner % cfg.head_dim:
    raise ValueError(
      f"{where}.head_dim={cfg.head_dim} must divide d_inner = expand * d_model = {d_inner} "
      "(the heads split the inner width)"
    )
  n_heads = d_inner // cfg.head_dim
  if n_heads % cfg.n_groups:
    raise ValueError(f"{where}.n_groups={cfg.n_groups} must divide n_heads = d_inner / head_dim = {n_heads}")
  if not 0.0 < cfg.dt_min <= cfg.dt_max:
    raise ValueError(f"{where}.dt_min={cfg.dt_min} and dt_max={cfg.dt_max} must satisfy 0 < dt_min <= dt_max")


# ----------------------------------------------------------------------------------------------------------
# The SSD layer: pure functions. Shapes: x (B, L, H, P), dt (B, L, H) > 0, a (H,) < 0, b and c (B, L, G, N),
# d (H,), state (B, H, P, N). Heads are grouped contiguously: head h reads group h // (H / G), as in the reference.


def _einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """An SSD matmul at full fp32 precision: by default TPUs multiply fp32 in one bf16 pass and recent NVIDIA GPUs
  in TF32 (10-bit mantissas), which would break the chunked = recurrent equality and the fp32 SSM the stack
  promises. At the default config the SSD's matmuls are ~10% of the stack's FLOPs (`stack_flops`, 370 patches)."""
  return jnp.einsum(spec, a, b, precision=jax.lax.Precision.HIGHEST)


def _segsum(a: jax.Array) -> jax.Array:
  """a (..., Q) -> (..., Q, Q): [i, j] = a[j+1] + ... + a[i] for i >= j, -inf above the diagonal.

  Summed per (i, j) from a masked cumulative sum rather than as cumsum[i] - cumsum[j], whose cancellation loses
  digits when the cumulative sums are large (reference: ssd_minimal.segsum)."""
  q = a.shape[-1]
  rows = jnp.arange(q)[:, None]
  cols = jnp.arange(q)[None, :]
  terms = jnp.where(rows > cols, a[..., :, None], 0.0)  # [k, j] = a[k] for k > j
  seg = jnp.cumsum(terms, axis=-2)
  return jnp.where(rows >= cols, seg, -jnp.inf)


def _grouped(t: jax.Array, n_groups: int) -> jax.Array:
  """(..., H, ...) with heads at axis 3 of a chunked (B, C, Q, H, ...) array -> (..., G, H/G, ...)."""
  return t.reshape(t.shape[:3] + (n_groups, t.shape[3] // n_groups) + t.shape[4:])


def ssd_chunked(
  x: jax.Array,
  dt: jax.Array,
  a: jax.Array,
  b: jax.Array,
  c: jax.Array,
  d: jax.Array,
  chunk_size: int,
  initial_state: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The SSD over whole sequences in its chunked (matmul) form -> (y (B, L, H, P), final state (B, H, P, N)), fp32.

  L is zero-padded internally to a multiple of the chunk length q = min(chunk_size, L); padded positions have
  dt = 0 (no decay, no input), so the final state is the state after position L - 1.
  """
  x, dt, a, b, c, d = (t.astype(jnp.float32) for t in (x, dt, a, b, c, d))
  bsz, length, n_heads, head_dim = x.shape
  n_groups, d_state = b.shape[-2:]
  q = min(chunk_size, length)
  n_chunks = -(-length // q)
  pad = n_chunks * q - length
  chunked = lambda t: jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2)).reshape((bsz, n_chunks, q) + t.shape[2:])
  xc, dtc, bc, cc = chunked(x), chunked(dt), chunked(b), chunked(c)
  xdt = _grouped(xc * dtc[..., None], n_groups)  # (B, C, Q, G, R, P): the input dt_t x_t of each position
  log_decay = _grouped(dtc * a, n_groups)  # (B, C, Q, G, R): dt_t A, log of the decay at each step
  log_decay = jnp.moveaxis(log_decay, 2, -1)  # (B, C, G, R, Q)
  decay_in = jnp.exp(jnp.cumsum(log_decay, axis=-1))  # decay from the chunk's entry state to position i
  within = jnp.exp(_segsum(log_decay))  # (B, C, G, R, Q, Q): decay from position j to position i >= j
  # 1. Within each chunk: y_i = sum_{j <= i} (C_i . B_j) decay(j -> i) dt_j x_j, as a masked (Q x Q) matmul.
  scores = _einsum("bcign,bcjgn->bcgij", cc, bc)[:, :, :, None] * within
  y = _einsum("bcgrij,bcjgrp->bcigrp", scores, xdt)
  # 2. The state each chunk adds by its end: sum_j decay(j -> end) dt_j x_j B_j^T.
  to_end = jnp.moveaxis(within[..., -1, :], -1, 2)  # (B, C, Q, G, R): the last row of `within`
  chunk_states = _einsum("bcjgn,bcjgrp->bcgrpn", bc, xdt * to_end[..., None])
  # 3. Across chunks: the state entering chunk k is decay(chunk k-1) * state entering k-1 + what k-1 added.
  chunk_decay = decay_in[..., -1]  # (B, C, G, R)
  if initial_state is None:
    initial_state = jnp.zeros((bsz, n_heads, head_dim, d_state), jnp.float32)
  s0 = initial_state.astype(jnp.float32).reshape(bsz, n_groups, n_heads // n_groups, head_dim, d_state)

  def across(s, inputs):
    decay_k, added_k = inputs
    return decay_k[..., None, None] * s + added_k, s

  final, entering = jax.lax.scan(across, s0, (jnp.moveaxis(chunk_decay, 1, 0), jnp.moveaxis(chunk_states, 1, 0)))
  entering = jnp.moveaxis(entering, 0, 1)  # (B, C, G, R, P, N)
  # 4. The entry state's contribution at each position: decay(entry -> i) * (state C_i).
  y = y + _einsum("bcign,bcgrpn->bcigrp", cc, entering) * jnp.moveaxis(decay_in, -1, 2)[..., None]
  y = y.reshape(bsz, n_chunks * q, n_heads, head_dim)[:, :length]
  return y + d[:, None] * x, final.reshape(bsz, n_heads, head_dim, d_state)


def ssd_recurrent(
  x: jax.Array,
  dt: jax.Array,
  a: jax.Array,
  b: jax.Array,
  c: jax.Array,
  d: jax.Array,
  initial_state: jax.Array | None = None,
  valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The SSD one position at a time -> (y (B, L, H, P), final state (B, H, P, N)), fp32.

  `valid` (L,) bool: a position with valid=False leaves the state as it was (its output is meaningless).
  """
  x, dt, a, b, c, d = (t.astype(jnp.float32) for t in (x, dt, a, b, c, d))
  bsz, length, n_heads, head_dim = x.shape
  n_groups, d_state = b.shape[-2:]
  per_group = n_heads // n_groups
  if initial_state is None:
    initial_state = jnp.zeros((bsz, n_heads, head_dim, d_state), jnp.float32)
  if valid is None:
    valid = jnp.ones((length,), bool)

  def step(s, inputs):
    x_t, dt_t, b_t, c_t, ok = inputs  # (B, H, P), (B, H), (B, G, N), (B, G, N), ()
    b_h = jnp.repeat(b_t, per_group, axis=1)  # (B, H, N)
    c_h = jnp.repeat(c_t, per_group, axis=1)
    s_new = jnp.exp(dt_t * a)[..., None, None] * s + (dt_t[..., None] * x_t)[..., None] * b_h[:, :, None, :]
    y_t = _einsum("bhpn,bhn->bhp", s_new, c_h) + d[:, None] * x_t
    return jnp.where(ok, s_new, s), y_t

  time_major = lambda t: jnp.moveaxis(t, 1, 0)
  final, y = jax.lax.scan(
    step, initial_state.astype(jnp.float32), (time_major(x), time_major(dt), time_major(b), time_major(c), valid)
  )
  return time_major(y), final


# ----------------------------------------------------------------------------------------------------------
# Causal depthwise conv over time. x (B, L, *ch), kernel (K, *ch), bias (*ch); tap K-1 multiplies the current
# position (PyTorch's Conv1d with padding K-1, its extra outputs dropped, as in the reference).


def _conv_taps(taps: list[jax.Array], kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """sum_k taps[k] * kernel[k] + bias, in one fixed order (the whole and streaming forms share it)."""
  out = taps[0] * kernel[0]
  for k in range(1, len(taps)):
    out = out + taps[k] * kernel[k]
  return out + bias


def causal_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """out[t] = sum_k kernel[k] x[t - K + 1 + k] + bias, zeros before the first position; fp32."""
  k, length = kernel.shape[0], x.shape[1]
  xp = jnp.pad(x.astype(jnp.float32), [(0, 0), (k - 1, 0)] + [(0, 0)] * (x.ndim - 2))
  return _conv_taps([xp[:, i : i + length] for i in range(k)], kernel, bias)


def causal_conv_steps(
  x: jax.Array, state: jax.Array, valid: jax.Array, kernel: jax.Array, bias: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """`causal_conv` a few positions at a time: state (B, K-1, *ch) holds the last K-1 valid inputs (zeros at the
  start). A slot with valid=False leaves the state as it was. Returns (out (B, S, *ch), new state); fp32."""

  def step(window_prev, inputs):
    x_t, ok = inputs
    window = jnp.concatenate([window_prev, x_t[:, None]], axis=1)  # (B, K, *ch)
    out = _conv_taps([window[:, i] for i in range(window.shape[1])], kernel, bias)
    return jnp.where(ok, window[:, 1:], window_prev), out

  state, out = jax.lax.scan(step, state.astype(jnp.float32), (jnp.moveaxis(x.astype(jnp.float32), 1, 0), valid))
  return jnp.moveaxis(out, 0, 1), state


# ----------------------------------------------------------------------------------------------------------
# Norms (fp32).


def rms_norm(x: jax.Array, scale: jax.Array, eps: float = NORM_EPS) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def gated_rms_norm(y: jax.Array, z: jax.Array, scale: jax.Array, n_groups: int, eps: float = NORM_EPS) -> jax.Array:
  """RMSNorm(y * SiLU(z)) over groups of d_inner / n_groups channels (the reference's RMSNormGated with
  norm_before_gate=False, group_size = d_inner / n_groups)."""
  g = y * jax.nn.silu(z)
  grouped = g.reshape(g.shape[:-1] + (n_groups, g.shape[-1] // n_groups))
  normed = grouped * jax.lax.rsqrt(jnp.mean(grouped * grouped, axis=-1, keepdims=True) + eps)
  return normed.reshape(g.shape) * scale


# ----------------------------------------------------------------------------------------------------------
# Parameters.


def _torch_linear_init(scale: float = 1.0, in_axis: int = 0, out_axis: int | tuple[int, ...] = -1):
  """PyTorch's Linear/Conv default (kaiming_uniform, a=sqrt(5)): U(+-scale / sqrt(fan_in))."""
  return nn.initializers.variance_scaling(scale**2 / 3.0, "fan_in", "uniform", in_axis=in_axis, out_axis=out_axis)


def _uniform(bound: float):
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _a_log_init(key, shape, dtype=jnp.float32):
  return jnp.log(jax.random.uniform(key, shape, dtype, *A_INIT_RANGE))


def _dt_bias_init(dt_min: float, dt_max: float):
  def init(key, shape, dtype=jnp.float32):
    u = jax.random.uniform(key, shape, dtype)
    dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), DT_INIT_FLOOR)
    return dt + jnp.log(-jnp.expm1(-dt))  # softplus^-1(dt)

  return init


class _Weight(nn.Module):
  """Declares `kernel` (and `bias` when bias_shape is given) under the module's own name."""

  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  init: Callable
  bias_shape: tuple[int, ...] | None = None
  bias_axes: tuple[str | None, ...] = ()
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array | None]:
    kernel = self.param("kernel", nn.with_logical_partitioning(self.init, self.axes), self.shape)
    if self.bias_shape is None:
      return kernel, None
    return kernel, self.param("bias", nn.with_logical_partitioning(self.bias_init, self.bias_axes), self.bias_shape)


class _Scale(nn.Module):
  """A norm's `scale`, initialised to ones."""

  size: int
  axis: str

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis,)), (self.size,))


class LayerWeights(NamedTuple):
  """One block's parameters (fp32)."""

  norm: jax.Array  # (d_model,)
  w_zx: jax.Array  # (d_model, 2, d_inner): z and x
  w_bc: jax.Array  # (d_model, 2, G, N): B and C
  w_dt: jax.Array  # (d_model, H)
  conv_x: jax.Array  # (K, d_inner)
  conv_x_bias: jax.Array  # (d_inner,)
  conv_bc: jax.Array  # (K, 2, G, N)
  conv_bc_bias: jax.Array  # (2, G, N)
  dt_bias: jax.Array  # (H,)
  a_log: jax.Array  # (H,)
  d: jax.Array  # (H,)
  gate_norm: jax.Array  # (d_inner,)
  w_out: jax.Array  # (d_inner, d_model)


class LayerParams(nn.Module):
  """Declares one block's parameters (names in the module docstring) and returns them as `LayerWeights`."""

  d_model: int
  d_inner: int
  n_heads: int
  n_groups: int
  d_state: int
  d_conv: int
  n_layers: int
  dt_min: float
  dt_max: float

  @nn.compact
  def __call__(self) -> LayerWeights:
    dm, di, h, g, n, k = self.d_model, self.d_inner, self.n_heads, self.n_groups, self.d_state, self.d_conv
    conv_bound = 1.0 / math.sqrt(k)  # PyTorch Conv1d default for a depthwise conv: fan_in = kernel size
    head = lambda name, init: self.param(name, nn.with_logical_partitioning(init, ("ssm_heads",)), (h,))
    norm = _Scale(dm, "ssm_embed", name="norm")()
    w_zx, _ = _Weight(
      (dm, 2, di), ("ssm_embed", None, "ssm_inner"), _torch_linear_init(out_axis=(1, 2)), name="in_zx"
    )()
    w_bc, _ = _Weight(
      (dm, 2, g, n),
      ("ssm_embed", None, "ssm_groups", "ssm_state"),
      _torch_linear_init(out_axis=(1, 2, 3)),
      name="in_bc",
    )()
    w_dt, _ = _Weight((dm, h), ("ssm_embed", "ssm_heads"), _torch_linear_init(), name="in_dt")()
    conv_x, conv_x_bias = _Weight(
      (k, di),
      ("ssm_conv", "ssm_inner"),
      _uniform(conv_bound),
      (di,),
      ("ssm_inner",),
      _uniform(conv_bound),
      name="conv_x",
    )()
    conv_bc, conv_bc_bias = _Weight(
      (k, 2, g, n),
      ("ssm_conv", None, "ssm_groups", "ssm_state"),
      _uniform(conv_bound),
      (2, g, n),
      (None, "ssm_groups", "ssm_state"),
      _uniform(conv_bound),
      name="conv_bc",
    )()
    dt_bias = head("dt_bias", _dt_bias_init(self.dt_min, self.dt_max))
    a_log = head("A_log", _a_log_init)
    d = head("D", nn.initializers.ones_init())
    gate_norm = _Scale(di, "ssm_inner", name="gate_norm")()
    # The reference rescales out_proj by 1/sqrt(n_layers) (GPT-2's residual-path scaling; one residual per block).
    w_out, _ = _Weight(
      (di, dm), ("ssm_inner", "ssm_embed"), _torch_linear_init(1.0 / math.sqrt(self.n_layers)), name="out"
    )()
    return LayerWeights(
      norm, w_zx, w_bc, w_dt, conv_x, conv_x_bias, conv_bc, conv_bc_bias, dt_bias, a_log, d, gate_norm, w_out
    )


# ----------------------------------------------------------------------------------------------------------
# One block's mixer (the residual branch after its pre-norm), whole-sequence and streaming.


def _project(w: LayerWeights, u: jax.Array, dtype) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """u (B, L, d_model) -> z, x (B, L, d_inner), bc (B, L, 2, G, N) before the conv, dt (B, L, H) after softplus."""
  zx = matmul("bld,dki->blki", u, w.w_zx, dtype)
  bc = matmul("bld,dkgn->blkgn", u, w.w_bc, dtype)
  dt = jax.nn.softplus(matmul("bld,dh->blh", u, w.w_dt, dtype) + w.dt_bias)
  return zx[:, :, 0], zx[:, :, 1], bc, dt


def _finish(w: LayerWeights, y: jax.Array, z: jax.Array, dtype) -> jax.Array:
  """SSD output (B, L, H, P) and gate z -> the block's residual update (B, L, d_model), fp32."""
  y = gated_rms_norm(y.reshape(z.shape), z, w.gate_norm, w.w_bc.shape[2])
  return matmul("bli,id->bld", y, w.w_out, dtype)


def _ssd_inputs(w: LayerWeights, x: jax.Array, bc: jax.Array):
  x = jax.nn.silu(x)
  bc = jax.nn.silu(bc)
  n_heads = w.w_dt.shape[1]
  return x.reshape(x.shape[:2] + (n_heads, -1)), bc[:, :, 0], bc[:, :, 1], -jnp.exp(w.a_log.astype(jnp.float32))


def mixer(w: LayerWeights, u: jax.Array, chunk_size: int, dtype) -> jax.Array:
  """The block's residual branch over whole sequences: u (B, L, d_model) normed -> (B, L, d_model), fp32."""
  z, x, bc, dt = _project(w, u, dtype)
  x = causal_conv(x, w.conv_x, w.conv_x_bias)
  bc = causal_conv(bc, w.conv_bc, w.conv_bc_bias)
  xh, b, c, a = _ssd_inputs(w, x, bc)
  y, _ = ssd_chunked(xh, dt, a, b, c, w.d, chunk_size)
  return _finish(w, y, z, dtype)


class LayerCarry(NamedTuple):
  """One block's streaming state (fp32): the conv inputs of the last K-1 valid positions and the SSM state."""

  conv_x: jax.Array  # (B, K-1, d_inner)
  conv_bc: jax.Array  # (B, K-1, 2, G, N)
  ssm: jax.Array  # (B, H, P, N)


def mixer_steps(
  w: LayerWeights, u: jax.Array, valid: jax.Array, carry: LayerCarry, dtype
) -> tuple[jax.Array, LayerCarry]:
  """`mixer` over S new slots from a carried state: u (B, S, d_model), valid (S,) -> (out, new carry)."""
  z, x, bc, dt = _project(w, u, dtype)
  x, conv_x = causal_conv_steps(x, carry.conv_x, valid, w.conv_x, w.conv_x_bias)
  bc, conv_bc = causal_conv_steps(bc, carry.conv_bc, valid, w.conv_bc, w.conv_bc_bias)
  xh, b, c, a = _ssd_inputs(w, x, bc)
  y, ssm = ssd_recurrent(xh, dt, a, b, c, w.d, carry.ssm, valid)
  return _finish(w, y, z, dtype), LayerCarry(conv_x, conv_bc, ssm)


# ----------------------------------------------------------------------------------------------------------
# The stack.


class Mamba2Stack(nn.Module):
  """Input Dense -> `n_layers` Mamba-2 blocks -> final RMSNorm -> optional Dense(d_out); see the module docstring.

  Dropout (rate `dropout_rate`, training only) applies to each block's residual update before it is added.
  The residual stream is kept in fp32; the output is in `dtype`.
  """

  n_layers: int
  d_out: int | None
  dropout_rate: float
  dtype: Any = jnp.float32
  d_model: int = 896
  d_state: int = 128
  d_conv: int = 4
  expand: int = 2
  head_dim: int = 64
  n_groups: int = 1
  chunk_size: int = 64
  dt_min: float = 0.001
  dt_max: float = 0.1

  CONFIG_FIELDS = ("d_model", "d_state", "d_conv", "expand", "head_dim", "n_groups", "chunk_size", "dt_min", "dt_max")

  @classmethod
  def from_config(
    cls, cfg: ml_collections.ConfigDict, n_layers: int, d_out: int | None, dropout_rate: float, dtype=jnp.float32
  ) -> Mamba2Stack:
    """The stack of `config.model.mamba2` (validated) with the model's depth, output width, dropout and dtype."""
    validate_config(cfg)
    fields = {k: cfg[k] for k in cls.CONFIG_FIELDS}
    return cls(n_layers=n_layers, d_out=d_out, dropout_rate=dropout_rate, dtype=dtype, **fields)

  @property
  def d_inner(self) -> int:
    return self.expand * self.d_model

  @property
  def n_heads(self) -> int:
    return self.d_inner // self.head_dim

  def setup(self):
    validate_config(ml_collections.ConfigDict({k: getattr(self, k) for k in self.CONFIG_FIELDS}), "Mamba2Stack")
    self.in_proj = nn.Dense(
      self.d_model,
      dtype=self.dtype,
      kernel_init=nn.with_logical_partitioning(_torch_linear_init(), ("ssm_in", "ssm_embed")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("ssm_embed",)),
    )
    self.layer = [
      LayerParams(
        self.d_model,
        self.d_inner,
        self.n_heads,
        self.n_groups,
        self.d_state,
        self.d_conv,
        self.n_layers,
        self.dt_min,
        self.dt_max,
      )
      for _ in range(self.n_layers)
    ]
    self.Dropout = [nn.Dropout(self.dropout_rate) for _ in range(self.n_layers)]
    self.final_norm = _Scale(self.d_model, "ssm_embed")
    self.out_proj = None
    if self.d_out is not None and self.d_out != self.d_model:
      self.out_proj = nn.Dense(
        self.d_out,
        dtype=self.dtype,
        kernel_init=nn.with_logical_partitioning(_torch_linear_init(), ("ssm_embed", "ssm_out")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("ssm_out",)),
      )

  def _head(self, h: jax.Array) -> jax.Array:
    h = rms_norm(h, self.final_norm())
    if self.out_proj is not None:
      h = self.out_proj(h.astype(self.dtype))
    return h.astype(self.dtype)

  def __call__(self, x: jax.Array, *, deterministic: bool, interlayer: Interlayer | None = None) -> jax.Array:
    """x (B, P, d_in) -> (B, P, d_out or d_model) in `dtype`; causal (see `stack_flops` for the work)."""
    h = self.in_proj(x).astype(jnp.float32)
    for i, layer in enumerate(self.layer):
      w = layer()
      update = mixer(w, rms_norm(h, w.norm), self.chunk_size, self.dtype)
      h = h + self.Dropout[i](update, deterministic=deterministic)
      if interlayer is not None:
        h = interlayer(i, h)
    return self._head(h)

  def initial_carry(self, batch: int) -> dict[str, jax.Array]:
    """Zero conv and SSM states of every block (what `__call__` starts from), stacked over layers, fp32."""
    k, g, n = self.d_conv - 1, self.n_groups, self.d_state
    zeros = lambda *shape: jnp.zeros((self.n_layers, batch) + shape, jnp.float32)
    return {
      "conv_x": zeros(k, self.d_inner),
      "conv_bc": zeros(k, 2, g, n),
      "ssm": zeros(self.n_heads, self.head_dim, n),
    }

  def step(
    self, x: jax.Array, valid: jax.Array, carry: dict[str, jax.Array], *, interlayer: Interlayer | None = None
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """S new slots (inference, no dropout): x (B, S, d_in), valid (S,) bool, carry from `initial_carry` or an
    earlier step -> (outputs (B, S, d_out or d_model) in `dtype`, new carry). Invalid slots leave the carry as it
    was; fed in chunks of any S, the outputs equal `__call__` on the whole sequence."""
    h = self.in_proj(x).astype(jnp.float32)
    new = []
    for i, layer in enumerate(self.layer):
      w = layer()
      update, c = mixer_steps(
        w, rms_norm(h, w.norm), valid, LayerCarry(*(carry[f][i] for f in LayerCarry._fields)), self.dtype
      )
      new.append(c)
      h = h + update
      if interlayer is not None:
        h = interlayer(i, h)
    return self._head(h), {f: jnp.stack([getattr(c, f) for c in new]) for f in LayerCarry._fields}


def stack_flops(cfg: ml_collections.ConfigDict, n_layers: int, d_in: int, d_out: int | None, n_patches: int) -> int:
  """Matmul FLOPs (2 x multiply-adds) of one trial's forward pass through the stack over `n_patches` positions.

  Per position: the input Dense, each block's in-projections (z, x, B, C, dt), its depthwise conv (d_conv taps
  over x, B and C), its out-projection, and the output Dense when there is one. Per block, the chunked SSD over
  the padded length (ceil(P / q) chunks of q = min(chunk_size, P)): C.B^T (q x q per group), the masked scores
  times dt x (q x q x head_dim per head; the masked half is computed too), the chunk states (q x head_dim x
  d_state per head) and the entry states' read-out (the same). Elementwise work (norms, SiLU, exp, the
  scan across chunks' decay-and-add) is left out, as MFU conventions do.
  """
  d_model, n, g = cfg.d_model, cfg.d_state, cfg.n_groups
  d_inner = cfg.expand * d_model
  n_heads = d_inner // cfg.head_dim
  per_position = 2 * d_model * (2 * d_inner + 2 * g * n + n_heads)  # in-projections
  per_position += 2 * cfg.d_conv * (d_inner + 2 * g * n)  # depthwise conv
  per_position += 2 * d_inner * d_model  # out-projection
  q = min(cfg.chunk_size, n_patches)
  n_chunks = -(-n_patches // q)
  per_chunk = 2 * q * q * g * n + 2 * q * q * d_inner + 2 * (2 * q * d_inner * n)
  flops = 2 * d_in * d_model * n_patches + n_layers * (per_position * n_patches + per_chunk * n_chunks)
  if d_out is not None and d_out != d_model:
    flops += 2 * d_model * d_out * n_patches
  return flops
