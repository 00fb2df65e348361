"""A PyTorch-compatible GRU layer (gate order r, z, n; six biases) built from `nn.scan` (SPEC §3.2).

The input projection of every time step is one large matmul outside the recurrence; the scan carries
only `h @ W_h`. Kernels are stored as (in, 3, H): the gate axis is separate so that the hidden axis can be
sharded over the 'model' mesh axis with every device holding r, z and n of its own hidden units (gates
stay local; only h is all-gathered per step). A PyTorch `weight_ih_l{k}` (3H, in) converts with
`.T.reshape(in, 3, H)`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn


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


def gru_gates(xp: jax.Array, hp: jax.Array, h: jax.Array) -> jax.Array:
  """One GRU update from input and recurrent projections ((B, 3, H) each, biases included), in fp32."""
  r = jax.nn.sigmoid(xp[:, 0] + hp[:, 0])
  z = jax.nn.sigmoid(xp[:, 1] + hp[:, 1])
  n = jnp.tanh(xp[:, 2] + r * hp[:, 2])
  return (1.0 - z) * n + z * h


class GRUStep(nn.Module):
  """The recurrent half of a GRU step: owns `w_hh` (H, 3, H) and `b_hh` (3, H); the carry is fp32."""

  hidden: int
  dtype: jnp.dtype = jnp.float32
  hidden_axis: str = "hidden"

  @nn.compact
  def __call__(self, h: jax.Array, xp: jax.Array):
    w_hh = self.param("w_hh", nn.with_logical_partitioning(
        _as_gate_kernel(nn.initializers.orthogonal()), ("gru_in", None, self.hidden_axis)),
        (self.hidden, 3, self.hidden))
    b_hh = self.param("b_hh", nn.with_logical_partitioning(_bias_init(self.hidden), (None, self.hidden_axis)),
                      (3, self.hidden))
    hp = matmul("bi,igh->bgh", h, w_hh, self.dtype) + b_hh
    h_new = gru_gates(xp, hp, h)
    return h_new, h_new.astype(self.dtype)


class GRULayer(nn.Module):
  """One GRU layer over (B, P, in) -> (B, P, H), starting from a given initial state (B, H) or (H,)."""

  hidden: int
  dtype: jnp.dtype = jnp.float32
  unroll: int = 1
  hidden_axis: str = "hidden"   # logical name of the hidden axis (the sharding rules map it to a mesh axis)

  @nn.compact
  def __call__(self, x: jax.Array, h0: jax.Array) -> jax.Array:
    w_ih = self.param("w_ih", nn.with_logical_partitioning(
        _as_gate_kernel(nn.initializers.xavier_uniform()), ("gru_in", None, self.hidden_axis)),
        (x.shape[-1], 3, self.hidden))
    b_ih = self.param("b_ih", nn.with_logical_partitioning(_bias_init(self.hidden), (None, self.hidden_axis)),
                      (3, self.hidden))
    # Hoisted input projection: one (B*P, in) x (in, 3H) matmul for all time steps.
    xp = matmul("bpi,igh->bpgh", x, w_ih, self.dtype) + b_ih
    h0 = jnp.broadcast_to(h0.astype(jnp.float32), (x.shape[0], self.hidden))
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

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    h0 = self.param("h0", nn.with_logical_partitioning(_h0_init, (self.hidden_axis,)), (self.hidden,))
    for i in range(self.n_layers):
      x = GRULayer(self.hidden, self.dtype, self.unroll, self.hidden_axis, name=f"layer_{i}")(x, h0)
      if i < self.n_layers - 1:
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    return x
