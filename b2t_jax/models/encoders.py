"""The sequence stacks a decoder composes, by `config.model.encoder`: one interface, three kinds.

Every stack maps patches (B, P, d_in) to (B, P, width) causally and offers the same two faces: the whole sequence
(`__call__(x, *, deterministic, interlayer=None)`, training and evaluation) and the streaming pair
(`initial_carry(batch)`, `step(x, valid, carry, *, interlayer=None)`). `interlayer(i, h)` maps the stream after
layer i: intermediate CTC reads and writes it there (`IntermediateCTC`).

- `gru`: `gru.GRUStack` (SPEC §3.2), `width` hidden units; its output width is its hidden width.
- `transformer`: `transformer.TransformerStack` (`config.model.transformer`).
- `mamba2`: `mamba2.Mamba2Stack` (`config.model.mamba2`).
For the non-GRU kinds `width` is the output width when the stack must keep one (the triple model's noise stack,
which returns the patch width); otherwise they return their own model width.

Only this module and the config check know the kinds; `decoders.py` asks `make_stack` for a stack.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from b2t_jax.models import gru, mamba2, transformer

ENCODERS = ("gru", "transformer", "mamba2")


def make_stack(hp: Any, n_layers: int, width: int, *, keep_width: bool, hidden_axis: str, dtype) -> nn.Module:
  """The `hp.encoder` stack (hp: `decoders.ModelHParams`) of `n_layers` layers: a GRU of `width` hidden units, or
  a transformer / Mamba-2 stack projecting back to `width` when `keep_width`."""
  if hp.encoder == "gru":
    return gru.GRUStack(
      n_layers=n_layers,
      hidden=width,
      dropout_rate=hp.rnn_dropout,
      dtype=dtype,
      unroll=hp.gru_unroll,
      hidden_axis=hidden_axis,
      backward=hp.gru_backward,
      remat=hp.gru_remat,
      wavefront=hp.gru_wavefront,
    )
  d_out = width if keep_width else None
  if hp.encoder == "transformer":
    return transformer.TransformerStack.from_config(hp.transformer, n_layers, d_out, hp.rnn_dropout, dtype)
  if hp.encoder == "mamba2":
    return mamba2.Mamba2Stack.from_config(hp.mamba2, n_layers, d_out, hp.rnn_dropout, dtype)
  raise ValueError(f"config.model.encoder={hp.encoder!r}: expected one of {', '.join(ENCODERS)}")


def output_width(hp: Any, width: int, *, keep_width: bool) -> int:
  """The width of what `make_stack(hp, ..., width, keep_width=...)` returns."""
  if hp.encoder == "gru" or keep_width:
    return width
  return (hp.transformer if hp.encoder == "transformer" else hp.mamba2).d_model


def stream_width(hp: Any, width: int) -> int:
  """The width of the stream `interlayer` sees between layers (GRU: its hidden width; others: d_model)."""
  return width if hp.encoder == "gru" else output_width(hp, width, keep_width=False)


def stack_flops(hp: Any, n_layers: int, d_in: int, width: int, n_patches: int, *, keep_width: bool) -> int:
  """Matmul FLOPs of one trial's forward pass through `make_stack(hp, n_layers, width, ...)` over `n_patches`."""
  if hp.encoder == "gru":
    return gru.stack_flops(n_layers, d_in, width) * n_patches
  d_out = width if keep_width else None
  module = transformer if hp.encoder == "transformer" else mamba2
  return module.stack_flops(getattr(hp, hp.encoder), n_layers, d_in, d_out, n_patches)


class IntermediateCTC(nn.Module):
  """Self-conditioned intermediate CTC (Nozaki & Komatsu, 2021) after one layer of a stack: logits =
  Dense(RMSNorm(h)) (an auxiliary CTC head, fp32), and the stream continues as h + Dense(softmax(logits)), so
  later layers are conditioned on the intermediate phoneme posteriors. Returns (logits (B, P, C), new stream)."""

  n_classes: int
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = nn.RMSNorm(dtype=jnp.float32, param_dtype=jnp.float32, name="norm")(h.astype(jnp.float32))
    logits = nn.Dense(
      self.n_classes,
      dtype=self.dtype,
      kernel_init=nn.with_logical_partitioning(nn.linear.default_kernel_init, ("ictc_width", "classes")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("classes",)),
      name="head",
    )(x).astype(jnp.float32)
    back = nn.Dense(
      self.width,
      dtype=self.dtype,
      kernel_init=nn.with_logical_partitioning(nn.linear.default_kernel_init, ("classes", "ictc_width")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("ictc_width",)),
      name="condition",
    )(jax.nn.softmax(logits, axis=-1))
    return logits, (h.astype(jnp.float32) + back.astype(jnp.float32)).astype(h.dtype)
