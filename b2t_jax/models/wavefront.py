"""All L layers of a GRU stack in one scan of P + L - 1 iterations (config.model.gru_wavefront).

Layer l runs time step s - l at iteration s, with the same parameters, dropout masks and results as the
layer-by-layer stack: sequential depth P + L - 1 instead of L·P, for accelerators whose small-batch step is
latency bound. Layers >= 1 then project their inputs inside the loop (B rows per matmul instead of B·P), which
costs time where the step is compute bound (CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from b2t_jax.models.cell import BACKWARDS, gate_grads, gru_cell, matmul


def _wave_step(h, x, w_ih, b_ih, w_hh, b_hh, keep_prob, dtype):
  """One wavefront iteration: every layer advances one time step. Returns the new carry, the last layer's
  output, and what the custom backward needs (the dropped-out inputs of layers >= 1 and the gate values)."""
  n_layers = h.shape[0]
  xp = x["xp0"][None]
  below = None
  if n_layers > 1:
    below = h[:-1].astype(dtype)  # what layers 0..L-2 output
    if "keep" in x:
      below = jnp.where(x["keep"], below / keep_prob, jnp.zeros_like(below))  # == nn.Dropout's arithmetic
    xp = jnp.concatenate([xp, matmul("lbi,ligh->lbgh", below, w_ih, dtype) + b_ih[:, None]], axis=0)
  gated, (r, z, n, hp_n) = gru_cell(h, xp, w_hh, b_hh, dtype)  # all layers in one batched matmul
  h_new = jnp.where(x["active"][:, None, None], gated, h)
  return h_new, h_new[-1].astype(dtype), (h, below, r, z, n, hp_n)


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
  masks = {k: v for k, v in xs.items() if k != "xp0"}  # the backward needs the masks, not xp0
  return ys, (masks, res, w_ih, w_hh)


def _wave_custom_bwd(keep_prob, dtype, unroll, saved, g):
  masks, (h_prev, below, r, z, n, hp_n), w_ih, w_hh = saved
  n_layers = w_hh.shape[0]
  # One transposed copy of each kernel before the loop (see gru._recurrence_bwd: in-loop transposes are slow
  # on CPU).
  w_hh_t = jnp.transpose(w_hh, (0, 2, 3, 1))  # (L, 3, H, H_in)
  w_ih_t = None if w_ih is None else jnp.transpose(w_ih, (0, 2, 3, 1))

  def step(dh_next, inputs):
    x, g_s, hprev_s, r_s, z_s, n_s, hpn_s = inputs
    dh = dh_next.at[-1].add(g_s.astype(jnp.float32))
    active = x["active"][:, None, None]
    dh_step = jnp.where(active, dh, 0.0)  # what flows through this step's gates
    dxp, dhp = gate_grads(dh_step, hprev_s, r_s, z_s, n_s, hpn_s)  # (L, B, 3, H) each
    dh_prev = jnp.where(active, dh * z_s, dh) + matmul("lbgh,lghi->lbi", dhp, w_hh_t, dtype)
    if n_layers > 1:
      dbelow = matmul("lbgh,lghi->lbi", dxp[1:], w_ih_t, dtype)
      if "keep" in x:
        dbelow = jnp.where(x["keep"], dbelow / keep_prob, 0.0)
      dh_prev = dh_prev.at[:-1].add(dbelow)
    return dh_prev, dxp

  dh_init, dxp = jax.lax.scan(
    step, jnp.zeros_like(h_prev[0]), (masks, g, h_prev, r, z, n, hp_n), reverse=True, unroll=unroll
  )
  dhp = dxp.at[..., 2, :].multiply(r)
  dw_hh = matmul("slbi,slbgh->ligh", h_prev, dhp, dtype)
  dxs = {"xp0": dxp[:, 0], **{k: None for k in masks}}
  if n_layers > 1:
    dw_ih, db_ih = matmul("slbi,slbgh->ligh", below, dxp[:, 1:], dtype), dxp[:, 1:].sum(axis=(0, 2))
  else:
    dw_ih = db_ih = None
  return (
    dxs,
    dh_init,
    None if dw_ih is None else dw_ih.astype(w_ih.dtype),
    db_ih,
    dw_hh.astype(w_hh.dtype),
    dhp.sum(axis=(0, 2)),
  )


_wave_custom.defvjp(_wave_custom_fwd, _wave_custom_bwd)


def gru_wavefront(
  xp0: jax.Array,
  h0: jax.Array,
  w_ih: jax.Array | None,
  b_ih: jax.Array | None,
  w_hh: jax.Array,
  b_hh: jax.Array,
  keep: jax.Array | None,
  keep_prob: float,
  dtype=jnp.float32,
  unroll: int = 1,
  remat: bool = False,
  backward: str = "custom",
) -> jax.Array:
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
    "active": (it >= layer) & (it < layer + steps),  # (iters, L)
  }
  if keep is not None:
    # Layer j+1 reads layer j's time step s - j - 1 at iteration s: skew mask j by j + 1 iterations.
    tm = jnp.swapaxes(keep, 1, 2)  # (L-1, P, B, H)
    xs["keep"] = jnp.stack(
      [jnp.pad(tm[j], ((j + 1, n_layers - 2 - j), (0, 0), (0, 0))) for j in range(n_layers - 1)], axis=1
    )  # (iters, L-1, B, H)
  h_init = jnp.broadcast_to(h0.astype(jnp.float32), (n_layers,) + h0.shape)
  if backward == "custom":
    run = lambda *args: _wave_custom(*args, keep_prob, dtype, unroll)
    if remat:
      run = jax.checkpoint(run)  # the backward pass reruns the forward scan instead of storing its gates
    ys = run(xs, h_init, w_ih, b_ih, w_hh, b_hh)
  elif backward == "autodiff":

    def step(h, x):
      h_new, y, _ = _wave_step(h, x, w_ih, b_ih, w_hh, b_hh, keep_prob, dtype)
      return h_new, y

    if remat:
      step = jax.checkpoint(step, prevent_cse=False)  # keep only the (L, B, H) carry per iteration
    _, ys = jax.lax.scan(step, h_init, xs, unroll=unroll)
  else:
    raise ValueError(f"model.gru_backward={backward!r}: expected one of {BACKWARDS}")
  return jnp.swapaxes(ys[n_layers - 1 :], 0, 1)
