"""The GRU step shared by every recurrence (scan, custom VJP, wavefront, streaming): PyTorch gate order r, z, n.

Kernels are stored as (in, 3, H): the gate axis is separate so that the hidden axis can be sharded over the
'model' mesh axis with every device holding r, z and n of its own hidden units (gates stay local; only h is
all-gathered per step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BACKWARDS = ("custom", "autodiff")


def matmul(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
  """einsum in the compute dtype, result in fp32. The product stays in `dtype` so that its transpose
  (the backward pass) is also a `dtype` matmul rather than an fp32 one with an up-cast operand."""
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype)).astype(jnp.float32)


def project_inputs(x: jax.Array, w_ih: jax.Array, b_ih: jax.Array, dtype) -> jax.Array:
  """The input projection of every time step at once: x (B, P, in) -> (B, P, 3, H), bias included."""
  return matmul("bpi,igh->bpgh", x, w_ih, dtype) + b_ih


def gru_cell(h: jax.Array, xp: jax.Array, w_hh: jax.Array, b_hh: jax.Array, dtype):
  """One GRU update: the recurrent projection h @ W_h + b_h, then the gates, in fp32.

  h (..., B, H) fp32, xp (..., B, 3, H) the input projection (bias included), w_hh (..., H, 3, H),
  b_hh (..., 3, H); the leading `...` is empty for one layer and (L,) for the wavefront's all-layers step.
  Returns (h', (r, z, n, hp_n)): the gate values and the n-gate recurrent projection, which the custom
  backward passes keep.
  """
  hp = matmul("...bi,...igh->...bgh", h, w_hh, dtype) + b_hh[..., None, :, :]
  r = jax.nn.sigmoid(xp[..., 0, :] + hp[..., 0, :])
  z = jax.nn.sigmoid(xp[..., 1, :] + hp[..., 1, :])
  n = jnp.tanh(xp[..., 2, :] + r * hp[..., 2, :])
  return (1.0 - z) * n + z * h, (r, z, n, hp[..., 2, :])


def gate_grads(dh: jax.Array, h_prev: jax.Array, r: jax.Array, z: jax.Array, n: jax.Array, hp_n: jax.Array):
  """Gradients of the pre-activations of one `gru_cell` update from dL/dh' (..., H): returns (dxp, dhp), each
  (..., 3, H): d(x @ W_i + b_i) and d(h @ W_h + b_h) (they differ only in the n gate, which r scales)."""
  dn_pre = dh * (1.0 - z) * (1.0 - n * n)
  dz_pre = dh * (h_prev - n) * z * (1.0 - z)
  dr_pre = dn_pre * hp_n * r * (1.0 - r)
  dxp = jnp.stack([dr_pre, dz_pre, dn_pre], axis=-2)
  return dxp, dxp.at[..., 2, :].multiply(r)
