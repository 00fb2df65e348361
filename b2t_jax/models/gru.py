"""A PyTorch-compatible GRU layer (gate order r, z, n; six biases) built from `nn.scan` (SPEC §3.2).

The input projection of every time step is one large matmul outside the recurrence; the scan carries
only `h @ W_h`. Kernels are stored as (in, 3H) so that `x @ W` needs no transpose; a PyTorch
`weight_ih_l{k}` (3H, in) converts with a single `.T`.
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


def gru_gates(xp: jax.Array, hp: jax.Array, h: jax.Array) -> jax.Array:
  """One GRU update from the input and recurrent projections (both (B, 3H) incl. their biases), in fp32."""
  x_r, x_z, x_n = jnp.split(xp, 3, axis=-1)
  h_r, h_z, h_n = jnp.split(hp, 3, axis=-1)
  r = jax.nn.sigmoid(x_r + h_r)
  z = jax.nn.sigmoid(x_z + h_z)
  n = jnp.tanh(x_n + r * h_n)
  return (1.0 - z) * n + z * h


class GRUStep(nn.Module):
  """The recurrent half of a GRU step: owns `w_hh` (H, 3H) and `b_hh`; carry is fp32."""

  hidden: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, xp: jax.Array):
    w_hh = self.param("w_hh", nn.initializers.orthogonal(), (self.hidden, 3 * self.hidden))
    b_hh = self.param("b_hh", _bias_init(self.hidden), (3 * self.hidden,))
    hp = jnp.dot(h.astype(self.dtype), w_hh.astype(self.dtype), preferred_element_type=jnp.float32) + b_hh
    h_new = gru_gates(xp, hp, h)
    return h_new, h_new.astype(self.dtype)


class GRULayer(nn.Module):
  """One GRU layer over (B, P, in) -> (B, P, H), starting from a given initial state (B, H) or (H,)."""

  hidden: int
  dtype: jnp.dtype = jnp.float32
  unroll: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, h0: jax.Array) -> jax.Array:
    w_ih = self.param("w_ih", nn.initializers.xavier_uniform(), (x.shape[-1], 3 * self.hidden))
    b_ih = self.param("b_ih", _bias_init(self.hidden), (3 * self.hidden,))
    # Hoisted input projection: one (B*P, in) x (in, 3H) matmul for all time steps.
    xp = jnp.einsum("bpi,ig->bpg", x.astype(self.dtype), w_ih.astype(self.dtype),
                    preferred_element_type=jnp.float32) + b_ih
    h0 = jnp.broadcast_to(h0.astype(jnp.float32), (x.shape[0], self.hidden))
    scan = nn.scan(GRUStep, variable_broadcast="params", split_rngs={"params": False},
                   in_axes=1, out_axes=1, unroll=self.unroll)
    _, ys = scan(hidden=self.hidden, dtype=self.dtype, name="cell")(h0, xp)
    return ys


class GRUStack(nn.Module):
  """`n_layers` GRU layers sharing one learned initial state h0 (H,), dropout between layers only."""

  n_layers: int
  hidden: int
  dropout_rate: float
  dtype: jnp.dtype = jnp.float32
  unroll: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    h0 = self.param("h0", _h0_init, (self.hidden,))
    for i in range(self.n_layers):
      x = GRULayer(self.hidden, self.dtype, self.unroll, name=f"layer_{i}")(x, h0)
      if i < self.n_layers - 1:
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    return x
