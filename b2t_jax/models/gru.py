"""A PyTorch-compatible GRU layer (gate order r, z, n; six biases) and the stack of them (SPEC §3.2).

The input projection of every time step is one large matmul outside the recurrence; the recurrence carries
only `h @ W_h` (`cell.gru_cell`, the one GRU step every path below uses). Kernels are stored as (in, 3, H)
(see `cell`); a PyTorch `weight_ih_l{k}` (3H, in) converts with `.T.reshape(in, 3, H)`.

Two backward passes compute the same gradients (`GRULayer.backward`):
- "autodiff": a scan over `gru_cell`, differentiated by JAX. The transpose of the scan adds a rank-B update
  of the whole (H, 3, H) recurrent kernel inside the reverse loop at every time step: the kernel's gradient is
  read and written P times per step (617 MB each time for the 7168-wide NoiseModel).
- "custom": `gru_recurrence`, a `jax.custom_vjp` whose reverse scan carries only dL/dh and stacks the gate
  gradients; the kernel gradient is then one (H, B·P) x (B·P, 3H) matmul over all time steps (what cuDNN does).

`GRUStack(wavefront=True)` runs all layers in one scan instead (`wavefront.gru_wavefront`), same parameters and
results. `GRUStack.step` advances every layer a few time steps from carried states (streaming inference).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from b2t_jax.models.cell import BACKWARDS, gate_grads, gru_cell, matmul, project_inputs
from b2t_jax.models.wavefront import gru_wavefront

__all__ = [
  "BACKWARDS",
  "GRULayer",
  "GRUStack",
  "LayerParams",
  "gru_layer",
  "gru_recurrence",
  "gru_steps",
  "matmul",
  "stack_flops",
]

# (layer index, that layer's outputs) -> what the next layer reads (intermediate CTC; models/encoders.py).
Interlayer = Callable[[int, jax.Array], jax.Array]


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


# PyTorch's nn.GRU initialisers, per weight: input kernels xavier-uniform, recurrent kernels orthogonal.
_KERNEL_INITS = {"ih": nn.initializers.xavier_uniform(), "hh": nn.initializers.orthogonal()}


def _gate_params(
  module: nn.Module, which: str, d_in: int, hidden: int, hidden_axis: str
) -> tuple[jax.Array, jax.Array]:
  """Declares `w_{which}` (in, 3, H) and `b_{which}` (3, H) on `module`; `which` is "ih" (input) or "hh" (recurrent)."""
  w = module.param(
    f"w_{which}",
    nn.with_logical_partitioning(_as_gate_kernel(_KERNEL_INITS[which]), ("gru_in", None, hidden_axis)),
    (d_in, 3, hidden),
  )
  b = module.param(f"b_{which}", nn.with_logical_partitioning(_bias_init(hidden), (None, hidden_axis)), (3, hidden))
  return w, b


def _recurrent_params(module: nn.Module, hidden: int, hidden_axis: str) -> tuple[jax.Array, jax.Array]:
  """Declares `w_hh` (H, 3, H) and `b_hh` (3, H) on `module`."""
  return _gate_params(module, "hh", hidden, hidden, hidden_axis)


def _input_params(module: nn.Module, d_in: int, hidden: int, hidden_axis: str) -> tuple[jax.Array, jax.Array]:
  """Declares `w_ih` (in, 3, H) and `b_ih` (3, H) on `module` (GRULayer and LayerParams share the tree)."""
  return _gate_params(module, "ih", d_in, hidden, hidden_axis)


class RecurrentParams(nn.Module):
  """Holds a layer's recurrent weights under the name 'cell' (the PyTorch import and checkpoints use it)."""

  hidden: int
  hidden_axis: str = "hidden"

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    return _recurrent_params(self, self.hidden, self.hidden_axis)


class LayerParams(nn.Module):
  """A GRULayer's parameters under the same names and init (`w_ih`, `b_ih`, `cell/{w_hh,b_hh}`), for GRUStack,
  which needs every layer's weights (the wavefront runs them all in one scan; streaming steps them)."""

  hidden: int
  hidden_axis: str = "hidden"

  @nn.compact
  def __call__(self, d_in: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    w_ih, b_ih = _input_params(self, d_in, self.hidden, self.hidden_axis)
    w_hh, b_hh = RecurrentParams(self.hidden, self.hidden_axis, name="cell")()
    return w_ih, b_ih, w_hh, b_hh


def _recurrence_fwd(xp, h0, w_hh, b_hh, dtype, unroll):
  """Forward scan over time-major inputs; returns (outputs, residuals for the backward pass)."""

  def step(h, xp_t):
    h_new, (r, z, n, hp_n) = gru_cell(h, xp_t, w_hh, b_hh, dtype)
    return h_new, (h_new, r, z, n, hp_n)

  _, (hs, r, z, n, hp_n) = jax.lax.scan(step, h0, jnp.swapaxes(xp, 0, 1), unroll=unroll)
  ys = jnp.swapaxes(hs, 0, 1).astype(dtype)
  h_prev = jnp.concatenate([h0[None], hs[:-1]], axis=0)  # (P, B, H): the state each step started from
  return ys, (h_prev, r, z, n, hp_n, w_hh)


def _recurrence_bwd(dtype, unroll, res, g):
  h_prev, r, z, n, hp_n, w_hh = res
  # dL/dh_prev = dhp @ W_h^T at every step. Contracting W_h over its (gate, out) axes in place is a
  # transposed-operand matmul that XLA:CPU runs ~6x slower at small batch; one transposed copy before the
  # loop (the size of W_h, read P times) makes every step a plain row-major matmul.
  w_t = jnp.transpose(w_hh, (1, 2, 0))  # (3, H, H_in)

  def step(dh_next, inputs):
    g_t, hprev_t, r_t, z_t, n_t, hpn_t = inputs
    dh = g_t + dh_next
    dxp, dhp = gate_grads(dh, hprev_t, r_t, z_t, n_t, hpn_t)  # (B, 3, H) each
    dh_prev = dh * z_t + matmul("bgh,ghi->bi", dhp, w_t, dtype)
    return dh_prev, dxp

  g = jnp.swapaxes(g, 0, 1).astype(jnp.float32)
  dh0, dxp = jax.lax.scan(step, jnp.zeros_like(h_prev[0]), (g, h_prev, r, z, n, hp_n), reverse=True, unroll=unroll)
  # Only dL/dh crossed the loop; the kernel gradient is one matmul over all (time, batch) rows.
  dhp = dxp.at[..., 2, :].multiply(r)
  dw_hh = matmul("pbi,pbgh->igh", h_prev, dhp, dtype)
  return jnp.swapaxes(dxp, 0, 1), dh0, dw_hh.astype(w_hh.dtype), dhp.sum(axis=(0, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def gru_recurrence(
  xp: jax.Array, h0: jax.Array, w_hh: jax.Array, b_hh: jax.Array, dtype=jnp.float32, unroll: int = 1
) -> jax.Array:
  """GRU recurrence over input projections xp (B, P, 3, H) (input biases included) from h0 (B, H) -> (B, P, H).

  Same values as scanning `gru_cell`; its VJP computes the recurrent-kernel gradient after the reverse loop.
  """
  return _recurrence_fwd(xp, h0, w_hh, b_hh, dtype, unroll)[0]


gru_recurrence.defvjp(
  lambda xp, h0, w_hh, b_hh, dtype, unroll: _recurrence_fwd(xp, h0, w_hh, b_hh, dtype, unroll), _recurrence_bwd
)


def gru_layer(
  x: jax.Array,
  h0: jax.Array,
  w_ih: jax.Array,
  b_ih: jax.Array,
  w_hh: jax.Array,
  b_hh: jax.Array,
  dtype=jnp.float32,
  unroll: int = 1,
  backward: str = "custom",
) -> jax.Array:
  """One GRU layer over (B, P, in) from h0 (B, H) or (H,) -> (B, P, H) in `dtype`; `backward` as in GRULayer."""
  xp = project_inputs(x, w_ih, b_ih, dtype)  # hoisted: one (B*P, in) x (in, 3H) matmul for all time steps
  h0 = jnp.broadcast_to(h0.astype(jnp.float32), (x.shape[0], w_hh.shape[-1]))
  if backward == "custom":
    return gru_recurrence(xp, h0, w_hh, b_hh, dtype, unroll)
  if backward != "autodiff":
    raise ValueError(f"model.gru_backward={backward!r}: expected one of {BACKWARDS}")

  def step(h, xp_t):
    h_new, _ = gru_cell(h, xp_t, w_hh, b_hh, dtype)
    return h_new, h_new.astype(dtype)

  _, ys = jax.lax.scan(step, h0, jnp.swapaxes(xp, 0, 1), unroll=unroll)
  return jnp.swapaxes(ys, 0, 1)


def gru_steps(
  x: jax.Array,
  h: jax.Array,
  valid: jax.Array,
  w_ih: jax.Array,
  b_ih: jax.Array,
  w_hh: jax.Array,
  b_hh: jax.Array,
  dtype=jnp.float32,
) -> tuple[jax.Array, jax.Array]:
  """A few time steps of one layer from a carried state (inference): x (B, S, in), h (B, H) fp32, valid (S,).

  A step whose `valid` is False leaves the state as it was (its output is computed but meaningless).
  Returns (outputs (B, S, H) in `dtype`, the new state (B, H) fp32).
  """
  xp = project_inputs(x, w_ih, b_ih, dtype)

  def step(h, inputs):
    xp_t, ok = inputs
    h_new, _ = gru_cell(h, xp_t, w_hh, b_hh, dtype)
    return jnp.where(ok, h_new, h), h_new

  h_last, ys = jax.lax.scan(step, h, (jnp.swapaxes(xp, 0, 1), valid))
  return jnp.swapaxes(ys, 0, 1).astype(dtype), h_last


class GRULayer(nn.Module):
  """One GRU layer over (B, P, in) -> (B, P, H), starting from a given initial state (B, H) or (H,)."""

  hidden: int
  dtype: jnp.dtype = jnp.float32
  unroll: int = 1
  hidden_axis: str = "hidden"  # logical name of the hidden axis (the sharding rules map it to a mesh axis)
  backward: str = "custom"  # custom | autodiff (see the module docstring; same values and gradients)

  @nn.compact
  def __call__(self, x: jax.Array, h0: jax.Array) -> jax.Array:
    w_ih, b_ih = _input_params(self, x.shape[-1], self.hidden, self.hidden_axis)
    w_hh, b_hh = RecurrentParams(self.hidden, self.hidden_axis, name="cell")()
    return gru_layer(x, h0, w_ih, b_ih, w_hh, b_hh, self.dtype, self.unroll, self.backward)


class GRUStack(nn.Module):
  """`n_layers` GRU layers sharing one learned initial state h0 (H,), dropout between layers only.

  Parameters: `h0`, `layer_{i}/{w_ih,b_ih,cell/{w_hh,b_hh}}` whatever the knobs (checkpoints do not depend on them).
  """

  n_layers: int
  hidden: int
  dropout_rate: float
  dtype: jnp.dtype = jnp.float32
  unroll: int = 1
  hidden_axis: str = "hidden"
  backward: str = "custom"
  remat: bool = False  # recompute each layer's forward in the backward pass instead of storing it
  wavefront: bool = False  # all layers in one scan of P + L - 1 steps (`wavefront.gru_wavefront`)

  def setup(self):
    self.h0 = self.param("h0", nn.with_logical_partitioning(_h0_init, (self.hidden_axis,)), (self.hidden,))
    # Lists name their modules `layer_0`.. and `Dropout_0`..: the parameter paths, and the dropout PRNG streams
    # (which fold in the module name), are those of the checkpoints and of the earlier compact definition.
    self.layer = [LayerParams(self.hidden, self.hidden_axis) for _ in range(self.n_layers)]
    self.Dropout = [nn.Dropout(self.dropout_rate) for _ in range(self.n_layers - 1)]

  def _weights(self, d_in: int) -> list[tuple[jax.Array, jax.Array, jax.Array, jax.Array]]:
    return [layer(d_in if i == 0 else self.hidden) for i, layer in enumerate(self.layer)]

  def __call__(self, x: jax.Array, *, deterministic: bool, interlayer: Interlayer | None = None) -> jax.Array:
    """(B, P, in) -> the last layer's outputs (B, P, H) in `dtype`, every layer starting from h0. `interlayer(i, y)`,
    when given, maps layer i's outputs before the dropout that feeds layer i + 1 (intermediate CTC)."""
    weights = self._weights(x.shape[-1])
    if self.wavefront:
      if interlayer is not None:
        raise ValueError("model.gru_wavefront runs all layers in one scan: nothing can act between two layers")
      return self._wavefront(x, weights, deterministic)
    run = functools.partial(gru_layer, dtype=self.dtype, unroll=self.unroll, backward=self.backward)
    if self.remat:
      run = jax.checkpoint(run)
    for i, w in enumerate(weights):
      x = run(x, self.h0, *w)
      if interlayer is not None:
        x = interlayer(i, x)
      if i < self.n_layers - 1:
        x = self.Dropout[i](x, deterministic=deterministic)
    return x

  def _wavefront(self, x: jax.Array, weights: list, deterministic: bool) -> jax.Array:
    w_ih0, b_ih0 = weights[0][:2]
    xp0 = project_inputs(x, w_ih0, b_ih0, self.dtype)
    stacked = lambda k, layers: jnp.stack([w[k] for w in layers]) if layers else None
    keep = None
    if self.n_layers > 1 and self.dropout_rate > 0.0 and not deterministic:
      # The layer-by-layer path's Dropout modules draw the same masks; applied to ones, their output is nonzero
      # exactly where they keep.
      shape = x.shape[:2] + (self.hidden,)
      keep = jnp.stack([drop(jnp.ones(shape, jnp.float32), deterministic=False) != 0 for drop in self.Dropout])
    return gru_wavefront(
      xp0,
      jnp.broadcast_to(self.h0, (x.shape[0], self.hidden)),
      stacked(0, weights[1:]),
      stacked(1, weights[1:]),
      stacked(2, weights),
      stacked(3, weights),
      keep,
      1.0 - self.dropout_rate,
      self.dtype,
      self.unroll,
      self.remat,
      self.backward,
    )

  def initial_carry(self, batch: int) -> jax.Array:
    """Every layer's state before the first time step: h0 broadcast to (n_layers, batch, H), fp32."""
    return jnp.broadcast_to(self.h0.astype(jnp.float32), (self.n_layers, batch, self.hidden))

  def step(
    self, x: jax.Array, valid: jax.Array, carry: jax.Array, *, interlayer: Interlayer | None = None
  ) -> tuple[jax.Array, jax.Array]:
    """A few time steps (inference, no dropout): x (B, S, in), valid (S,), carry (n_layers, B, H) from
    `initial_carry` or an earlier step -> (last layer's outputs (B, S, H), new carry). Invalid steps leave
    every layer's state as it was. `interlayer` as in `__call__`."""
    states = []
    for i, w in enumerate(self._weights(x.shape[-1])):
      x, h = gru_steps(x, carry[i], valid, *w, dtype=self.dtype)
      if interlayer is not None:
        x = interlayer(i, x)
      states.append(h)
    return x, jnp.stack(states)


def stack_flops(n_layers: int, d_in: int, hidden: int) -> int:
  """Matmul FLOPs of a GRU stack per time step and trial: input projection + recurrent projection."""
  flops = 0
  for i in range(n_layers):
    flops += 2 * (d_in if i == 0 else hidden) * 3 * hidden + 2 * hidden * 3 * hidden
  return flops
