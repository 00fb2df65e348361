"""A PyTorch-compatible GRU layer (gate order r, z, n; six biases) built from `nn.scan` (SPEC §3.2).

The input projection of every time step is one large matmul outside the recurrence; the scan carries
only `h @ W_h`. Kernels are stored as (in, 3, H): the gate axis is separate so that the hidden axis can be
sharded over the 'model' mesh axis with every device holding r, z and n of its own hidden units (gates
stay local; only h is all-gathered per step). A PyTorch `weight_ih_l{k}` (3H, in) converts with
`.T.reshape(in, 3, H)`.

Two backward passes compute the same gradients (`GRULayer.backward`):
- "autodiff": `nn.scan` over `GRUStep`, differentiated by JAX. The transpose of the scan adds a rank-B update
  of the whole (H, 3, H) recurrent kernel inside the reverse loop at every time step: the kernel's gradient is
  read and written P times per step (617 MB each time for the 7168-wide NoiseModel).
- "custom": `gru_recurrence`, a `jax.custom_vjp` whose reverse scan carries only dL/dh and stacks the gate
  gradients; the kernel gradient is then one (H, B·P) x (B·P, 3H) matmul over all time steps (what cuDNN does).

`GRUStack(wavefront=True)` (`gru_wavefront`) runs all L layers in one scan of P + L - 1 iterations (layer l
at time s - l), with the same parameters, dropout masks and results: sequential depth P + L - 1 instead of
L·P, for accelerators whose small-batch step is latency bound. Layers >= 1 then project their inputs inside the
loop (B rows per matmul instead of B·P), which costs time where the step is compute bound (CPU).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

BACKWARDS = ("custom", "autodiff")


def _bias_init(hidden: int):
  bound = 1.0 / math.sqrt(hidden)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _h0_init(key, shape, dtype=jnp.float32):
  # torch xavier_uniform_ on the reference's (1, 1, H) tensor: fan_in = fan_out = H.
  bound = math.sqrt(6.0 / (2 * shape[-1]))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _as_gate_kernel(init):
  """Applies a 2-D initializer to the (in, 3H) matrix (as PyTorch does to its (3H, in)) -> (in, 3, H)."""
  def gate_init(key, shape, dtype=jnp.float32):
    d_in, gates, hidden = shape
    return init(key, (d_in, gates * hidden), dtype).reshape(shape)
  return gate_init


def matmul(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
  """einsum in the compute dtype, result in fp32. The product stays in `dtype` so that its transpose
  (the backward pass) is also a `dtype` matmul rather than an fp32 one with an up-cast operand."""
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype)).astype(jnp.float32)


def _gate_values(xp: jax.Array, hp: jax.Array, h: jax.Array):
  """(h', r, z, n) of one GRU update; xp, hp (..., 3, H) with biases included, h (..., H)."""
  r = jax.nn.sigmoid(xp[..., 0, :] + hp[..., 0, :])
  z = jax.nn.sigmoid(xp[..., 1, :] + hp[..., 1, :])
  n = jnp.tanh(xp[..., 2, :] + r * hp[..., 2, :])
  return (1.0 - z) * n + z * h, r, z, n


def gru_gates(xp: jax.Array, hp: jax.Array, h: jax.Array) -> jax.Array:
  """One GRU update from input and recurrent projections ((B, 3, H) each, biases included), in fp32."""
  return _gate_values(xp, hp, h)[0]


def _gate_grads(dh: jax.Array, h_prev: jax.Array, r: jax.Array, z: jax.Array, n: jax.Array, hp_n: jax.Array):
  """Gradients of the pre-activations of one GRU update from dL/dh' (..., H): returns (dxp, dhp), each
  (..., 3, H): d(x @ W_i + b_i) and d(h @ W_h + b_h) (they differ only in the n gate, which r scales)."""
  dn_pre = dh * (1.0 - z) * (1.0 - n * n)
  dz_pre = dh * (h_prev - n) * z * (1.0 - z)
  dr_pre = dn_pre * hp_n * r * (1.0 - r)
  dxp = jnp.stack([dr_pre, dz_pre, dn_pre], axis=-2)
  return dxp, dxp.at[..., 2, :].multiply(r)


def _recurrent_params(module: nn.Module, hidden: int, hidden_axis: str) -> tuple[jax.Array, jax.Array]:
  """Declares `w_hh` (H, 3, H) and `b_hh` (3, H) on `module` (both backward variants use the same tree)."""
  w_hh = module.param("w_hh", nn.with_logical_partitioning(
      _as_gate_kernel(nn.initializers.orthogonal()), ("gru_in", None, hidden_axis)), (hidden, 3, hidden))
  b_hh = module.param("b_hh", nn.with_logical_partitioning(_bias_init(hidden), (None, hidden_axis)), (3, hidden))
  return w_hh, b_hh


class GRUStep(nn.Module):
  """The recurrent half of a GRU step: owns `w_hh` (H, 3, H) and `b_hh` (3, H); the carry is fp32."""

  hidden: int
  dtype: jnp.dtype = jnp.float32
  hidden_axis: str = "hidden"

  @nn.compact
  def __call__(self, h: jax.Array, xp: jax.Array):
    w_hh, b_hh = _recurrent_params(self, self.hidden, self.hidden_axis)
    hp = matmul("bi,igh->bgh", h, w_hh, self.dtype) + b_hh
    h_new = gru_gates(xp, hp, h)
    return h_new, h_new.astype(self.dtype)


def _input_params(module: nn.Module, d_in: int, hidden: int, hidden_axis: str) -> tuple[jax.Array, jax.Array]:
  """Declares `w_ih` (in, 3, H) and `b_ih` (3, H) on `module` (GRULayer and LayerParams share the tree)."""
  w_ih = module.param("w_ih", nn.with_logical_partitioning(
      _as_gate_kernel(nn.initializers.xavier_uniform()), ("gru_in", None, hidden_axis)), (d_in, 3, hidden))
  b_ih = module.param("b_ih", nn.with_logical_partitioning(_bias_init(hidden), (None, hidden_axis)), (3, hidden))
  return w_ih, b_ih


class RecurrentParams(nn.Module):
  """Holds the recurrent weights for the custom-VJP path under the same name ('cell') as the scanned GRUStep."""

  hidden: int
  hidden_axis: str = "hidden"

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    return _recurrent_params(self, self.hidden, self.hidden_axis)


def _recurrence_fwd(xp, h0, w_hh, b_hh, dtype, unroll):
  """Forward scan over time-major inputs; returns (outputs, residuals for the backward pass)."""
  def step(h, xp_t):
    hp = matmul("bi,igh->bgh", h, w_hh, dtype) + b_hh
    h_new, r, z, n = _gate_values(xp_t, hp, h)
    return h_new, (h_new, r, z, n, hp[:, 2])

  _, (hs, r, z, n, hp_n) = jax.lax.scan(step, h0, jnp.swapaxes(xp, 0, 1), unroll=unroll)
  ys = jnp.swapaxes(hs, 0, 1).astype(dtype)
  h_prev = jnp.concatenate([h0[None], hs[:-1]], axis=0)   # (P, B, H): the state each step started from
  return ys, (h_prev, r, z, n, hp_n, w_hh)


def _recurrence_bwd(dtype, unroll, res, g):
  h_prev, r, z, n, hp_n, w_hh = res
  # dL/dh_prev = dhp @ W_h^T at every step. Contracting W_h over its (gate, out) axes in place is a
  # transposed-operand matmul that XLA:CPU runs ~6x slower at small batch; one transposed copy before the
  # loop (the size of W_h, read P times) makes every step a plain row-major matmul.
  w_t = jnp.transpose(w_hh, (1, 2, 0))                                   # (3, H, H_in)

  def step(dh_next, inputs):
    g_t, hprev_t, r_t, z_t, n_t, hpn_t = inputs
    dh = g_t + dh_next
    dxp, dhp = _gate_grads(dh, hprev_t, r_t, z_t, n_t, hpn_t)         # (B, 3, H) each
    dh_prev = dh * z_t + matmul("bgh,ghi->bi", dhp, w_t, dtype)
    return dh_prev, dxp

  g = jnp.swapaxes(g, 0, 1).astype(jnp.float32)
  dh0, dxp = jax.lax.scan(step, jnp.zeros_like(h_prev[0]), (g, h_prev, r, z, n, hp_n),
                          reverse=True, unroll=unroll)
  # Only dL/dh crossed the loop; the kernel gradient is one matmul over all (time, batch) rows.
  dhp = dxp.at[..., 2, :].multiply(r)
  dw_hh = matmul("pbi,pbgh->igh", h_prev, dhp, dtype)
  return jnp.swapaxes(dxp, 0, 1), dh0, dw_hh.astype(w_hh.dtype), dhp.sum(axis=(0, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def gru_recurrence(xp: jax.Array, h0: jax.Array, w_hh: jax.Array, b_hh: jax.Array, dtype=jnp.float32,
                   unroll: int = 1) -> jax.Array:
  """GRU recurrence over input projections xp (B, P, 3, H) (input biases included) from h0 (B, H) -> (B, P, H).

  Same values as scanning `GRUStep`; its VJP computes the recurrent-kernel gradient after the reverse loop.
  """
  return _recurrence_fwd(xp, h0, w_hh, b_hh, dtype, unroll)[0]


gru_recurrence.defvjp(lambda xp, h0, w_hh, b_hh, dtype, unroll: _recurrence_fwd(xp, h0, w_hh, b_hh, dtype, unroll),
                      _recurrence_bwd)


def _wave_step(h, x, w_ih, b_ih, w_hh, b_hh, keep_prob, dtype):
  """One wavefront iteration: every layer advances one time step. Returns the new carry, the last layer's
  output, and what the custom backward needs (the dropped-out inputs of layers >= 1 and the gate values)."""
  n_layers = h.shape[0]
  hp = matmul("lbi,ligh->lbgh", h, w_hh, dtype) + b_hh[:, None]          # all layers in one batched matmul
  xp = x["xp0"][None]
  below = None
  if n_layers > 1:
    below = h[:-1].astype(dtype)                                          # what layers 0..L-2 output
    if "keep" in x:
      below = jnp.where(x["keep"], below / keep_prob, jnp.zeros_like(below))   # == nn.Dropout's arithmetic
    xp = jnp.concatenate([xp, matmul("lbi,ligh->lbgh", below, w_ih, dtype) + b_ih[:, None]], axis=0)
  gated, r, z, n = _gate_values(xp, hp, h)
  h_new = jnp.where(x["active"][:, None, None], gated, h)
  return h_new, h_new[-1].astype(dtype), (h, below, r, z, n, hp[:, :, 2])


def _wave_scan(xs, h_init, w_ih, b_ih, w_hh, b_hh, keep_prob, dtype, unroll):
  def step(h, x):
    h_new, y, res = _wave_step(h, x, w_ih, b_ih, w_hh, b_hh, keep_prob, dtype)
    return h_new, (y, res)
  _, (ys, res) = jax.lax.scan(step, h_init, xs, unroll=unroll)
  return ys, res


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _wave_custom(xs, h_init, w_ih, b_ih, w_hh, b_hh, keep_prob, dtype, unroll):
  """The wavefront scan with a cuDNN-style VJP: the reverse scan carries only dL/dh (L, B, H) and stacks the
  gate gradients; the kernel gradients are matmuls over all (iteration, batch) rows after the loop."""
  return _wave_scan(xs, h_init, w_ih, b_ih, w_hh, b_hh, keep_prob, dtype, unroll)[0]


def _wave_custom_fwd(xs, h_init, w_ih, b_ih, w_hh, b_hh, keep_prob, dtype, unroll):
  ys, res = _wave_scan(xs, h_init, w_ih, b_ih, w_hh, b_hh, keep_prob, dtype, unroll)
  masks = {k: v for k, v in xs.items() if k != "xp0"}   # the backward needs the masks, not xp0
  return ys, (masks, res, w_ih, w_hh)


def _wave_custom_bwd(keep_prob, dtype, unroll, saved, g):
  masks, (h_prev, below, r, z, n, hp_n), w_ih, w_hh = saved
  n_layers = w_hh.shape[0]
  # One transposed copy of each kernel before the loop (see _recurrence_bwd: in-loop transposes are slow on CPU).
  w_hh_t = jnp.transpose(w_hh, (0, 2, 3, 1))                                # (L, 3, H, H_in)
  w_ih_t = None if w_ih is None else jnp.transpose(w_ih, (0, 2, 3, 1))

  def step(dh_next, inputs):
    x, g_s, hprev_s, r_s, z_s, n_s, hpn_s = inputs
    dh = dh_next.at[-1].add(g_s.astype(jnp.float32))
    active = x["active"][:, None, None]
    dh_step = jnp.where(active, dh, 0.0)                                    # what flows through this step's gates
    dxp, dhp = _gate_grads(dh_step, hprev_s, r_s, z_s, n_s, hpn_s)        # (L, B, 3, H) each
    dh_prev = jnp.where(active, dh * z_s, dh) + matmul("lbgh,lghi->lbi", dhp, w_hh_t, dtype)
    if n_layers > 1:
      dbelow = matmul("lbgh,lghi->lbi", dxp[1:], w_ih_t, dtype)
      if "keep" in x:
        dbelow = jnp.where(x["keep"], dbelow / keep_prob, 0.0)
      dh_prev = dh_prev.at[:-1].add(dbelow)
    return dh_prev, dxp

  dh_init, dxp = jax.lax.scan(step, jnp.zeros_like(h_prev[0]), (masks, g, h_prev, r, z, n, hp_n),
                              reverse=True, unroll=unroll)
  dhp = dxp.at[..., 2, :].multiply(r)
  dw_hh = matmul("slbi,slbgh->ligh", h_prev, dhp, dtype)
  dxs = {"xp0": dxp[:, 0], **{k: None for k in masks}}
  if n_layers > 1:
    dw_ih, db_ih = matmul("slbi,slbgh->ligh", below, dxp[:, 1:], dtype), dxp[:, 1:].sum(axis=(0, 2))
  else:
    dw_ih = db_ih = None
  return (dxs, dh_init, None if dw_ih is None else dw_ih.astype(w_ih.dtype), db_ih,
          dw_hh.astype(w_hh.dtype), dhp.sum(axis=(0, 2)))


_wave_custom.defvjp(_wave_custom_fwd, _wave_custom_bwd)


def gru_wavefront(xp0: jax.Array, h0: jax.Array, w_ih: jax.Array | None, b_ih: jax.Array | None, w_hh: jax.Array,
                  b_hh: jax.Array, keep: jax.Array | None, keep_prob: float, dtype=jnp.float32, unroll: int = 1,
                  remat: bool = False, backward: str = "custom") -> jax.Array:
  """All L layers of a GRU stack in one scan of P + L - 1 iterations; returns the last layer's (B, P, H) in dtype.

  At iteration s layer l runs time step s - l on what layer l - 1 produced at iteration s - 1, so the
  sequential depth is P + L - 1 small steps instead of L * P. Inputs: xp0 (B, P, 3, H) layer 0's hoisted input
  projection (bias included); h0 (B, H) every layer's initial state; w_ih (L-1, H, 3, H) / b_ih (L-1, 3, H)
  layers 1..L-1 (None for L = 1), projected inside the loop; w_hh (L, H, 3, H) / b_hh (L, 3, H); keep
  (L-1, B, P, H) the dropout keep masks of layers 0..L-2's outputs, or None without dropout. `backward` as in
  GRULayer: "custom" (kernel gradients after the reverse loop) or "autodiff" (JAX differentiates the scan).
  """
  n_layers = w_hh.shape[0]
  steps = xp0.shape[1]
  iters = steps + n_layers - 1
  it, layer = jnp.arange(iters)[:, None], jnp.arange(n_layers)[None]
  xs = {
      # Layer 0 idles for the last L-1 iterations: pad its projections there (the slot is masked).
      "xp0": jnp.pad(jnp.swapaxes(xp0, 0, 1), ((0, n_layers - 1), (0, 0), (0, 0), (0, 0))),
      # Ramp-up/ramp-down slots compute on stale inputs; they must leave the carry untouched.
      "active": (it >= layer) & (it < layer + steps),                       # (iters, L)
  }
  if keep is not None:
    # Layer j+1 reads layer j's time step s - j - 1 at iteration s: skew mask j by j + 1 iterations.
    tm = jnp.swapaxes(keep, 1, 2)                                           # (L-1, P, B, H)
    xs["keep"] = jnp.stack([jnp.pad(tm[j], ((j + 1, n_layers - 2 - j), (0, 0), (0, 0)))
                            for j in range(n_layers - 1)], axis=1)          # (iters, L-1, B, H)
  h_init = jnp.broadcast_to(h0.astype(jnp.float32), (n_layers,) + h0.shape)
  if backward == "custom":
    run = lambda *args: _wave_custom(*args, keep_prob, dtype, unroll)
    if remat:
      run = jax.checkpoint(run)   # the backward pass reruns the forward scan instead of storing its gates
    ys = run(xs, h_init, w_ih, b_ih, w_hh, b_hh)
  elif backward == "autodiff":
    def step(h, x):
      h_new, y, _ = _wave_step(h, x, w_ih, b_ih, w_hh, b_hh, keep_prob, dtype)
      return h_new, y
    if remat:
      step = jax.checkpoint(step, prevent_cse=False)   # keep only the (L, B, H) carry per iteration
    _, ys = jax.lax.scan(step, h_init, xs, unroll=unroll)
  else:
    raise ValueError(f"model.gru_backward={backward!r}: expected one of {BACKWARDS}")
  return jnp.swapaxes(ys[n_layers - 1:], 0, 1)


class LayerParams(nn.Module):
  """A GRULayer's parameters under the same names and init (`w_ih`, `b_ih`, `cell/{w_hh,b_hh}`), for the
  wavefront, which needs every layer's weights before its single scan."""

  hidden: int
  hidden_axis: str = "hidden"

  @nn.compact
  def __call__(self, d_in: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    w_ih, b_ih = _input_params(self, d_in, self.hidden, self.hidden_axis)
    w_hh, b_hh = RecurrentParams(self.hidden, self.hidden_axis, name="cell")()
    return w_ih, b_ih, w_hh, b_hh


class GRULayer(nn.Module):
  """One GRU layer over (B, P, in) -> (B, P, H), starting from a given initial state (B, H) or (H,)."""

  hidden: int
  dtype: jnp.dtype = jnp.float32
  unroll: int = 1
  hidden_axis: str = "hidden"   # logical name of the hidden axis (the sharding rules map it to a mesh axis)
  backward: str = "custom"      # custom | autodiff (see the module docstring; same values and gradients)

  @nn.compact
  def __call__(self, x: jax.Array, h0: jax.Array) -> jax.Array:
    w_ih, b_ih = _input_params(self, x.shape[-1], self.hidden, self.hidden_axis)
    # Hoisted input projection: one (B*P, in) x (in, 3H) matmul for all time steps.
    xp = matmul("bpi,igh->bpgh", x, w_ih, self.dtype) + b_ih
    h0 = jnp.broadcast_to(h0.astype(jnp.float32), (x.shape[0], self.hidden))
    if self.backward == "custom":
      w_hh, b_hh = RecurrentParams(self.hidden, self.hidden_axis, name="cell")()
      return gru_recurrence(xp, h0, w_hh, b_hh, self.dtype, self.unroll)
    if self.backward != "autodiff":
      raise ValueError(f"model.gru_backward={self.backward!r}: expected one of {BACKWARDS}")
    scan = nn.scan(GRUStep, variable_broadcast="params", split_rngs={"params": False},
                   in_axes=1, out_axes=1, unroll=self.unroll)
    _, ys = scan(hidden=self.hidden, dtype=self.dtype, hidden_axis=self.hidden_axis, name="cell")(h0, xp)
    return ys


class GRUStack(nn.Module):
  """`n_layers` GRU layers sharing one learned initial state h0 (H,), dropout between layers only."""

  n_layers: int
  hidden: int
  dropout_rate: float
  dtype: jnp.dtype = jnp.float32
  unroll: int = 1
  hidden_axis: str = "hidden"
  backward: str = "custom"
  remat: bool = False           # recompute each layer's forward in the backward pass instead of storing it
  wavefront: bool = False       # all layers in one scan of P + L - 1 steps (`gru_wavefront`)

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    h0 = self.param("h0", nn.with_logical_partitioning(_h0_init, (self.hidden_axis,)), (self.hidden,))
    if self.wavefront:
      params = [LayerParams(self.hidden, self.hidden_axis, name=f"layer_{i}")(x.shape[-1] if i == 0 else self.hidden)
                for i in range(self.n_layers)]
      w_ih0, b_ih0 = params[0][:2]
      xp0 = matmul("bpi,igh->bpgh", x, w_ih0, self.dtype) + b_ih0
      stacked = lambda k, layers: jnp.stack([p[k] for p in layers]) if layers else None
      keep = None
      if self.n_layers > 1 and self.dropout_rate > 0.0 and not deterministic:
        # The same nn.Dropout modules (names Dropout_0..) as the layer-by-layer path draw the same masks;
        # applied to ones, their output is nonzero exactly where they keep.
        shape = x.shape[:2] + (self.hidden,)
        keep = jnp.stack([nn.Dropout(self.dropout_rate)(jnp.ones(shape, jnp.float32), deterministic=False) != 0
                          for _ in range(self.n_layers - 1)])
      return gru_wavefront(xp0, jnp.broadcast_to(h0, (x.shape[0], self.hidden)),
                           stacked(0, params[1:]), stacked(1, params[1:]), stacked(2, params), stacked(3, params),
                           keep, 1.0 - self.dropout_rate, self.dtype, self.unroll, self.remat,
                           self.backward)
    layer_cls = nn.remat(GRULayer) if self.remat else GRULayer
    for i in range(self.n_layers):
      x = layer_cls(self.hidden, self.dtype, self.unroll, self.hidden_axis, self.backward, name=f"layer_{i}")(x, h0)
      if i < self.n_layers - 1:
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    return x
