"""A causal transformer stack: the encoder interface of `GRUStack` (whole sequence; streaming pair) over patches.

Input Dense(d_in -> d_model), then `n_layers` pre-norm blocks

    h = h + Dropout_attn(MHA(RMSNorm(h)))      causal multi-head self-attention, RoPE on q and k
    h = h + Dropout(SwiGLU(RMSNorm(h)))        (silu(x W_gate) * (x W_up)) W_down

then a final RMSNorm and, when `d_out` differs from `d_model`, Dense(d_model -> d_out).

- Attention is `jax.nn.dot_product_attention` (the library kernel; it computes the logits in fp32 and the
  softmax in fp32 whatever the operand dtype). Whole sequences use its causal mask and its local window
  `(window - 1, 0)`: position t attends to positions (t - window, t]; window = 0 attends to all of [0, t].
- Positions are rotary (RoPE, rotate-half pairing (i, i + head_dim/2), angle pos * rope_base^(-2i/head_dim)), so
  the model runs on trials longer than any it was trained on: attention sees only position differences.
- The MLP is SwiGLU rather than GELU: at equal parameters and FLOPs it trained to lower loss than the GELU MLP in
  Shazeer's comparison ("GLU Variants Improve Transformer", 2020), and it is what current LMs use; its three
  matrices are counted in `d_ff` (about 8/3 d_model keeps the parameters of a 4x GELU MLP).
- Numerics: the residual stream, RMSNorm, RoPE, SwiGLU's gate and the softmax are fp32; every matmul takes both
  operands in `dtype` (bf16 when asked; `cell.matmul`) and params stay fp32. The output is in `dtype`.
- Dropout (rng 'dropout', only when not deterministic): `attention_dropout` on the attention branch's output and
  `dropout_rate` on the MLP branch's output, each before its residual add. (The library kernel has no dropout
  on the attention probabilities.)
- Init: truncated-normal fan-in scaling (LeCun); the two projections that write into the residual stream
  (W_o, W_down) are scaled by 1/sqrt(2 n_layers) (GPT-2) so the stream's variance stays O(1) at init.

Streaming (`initial_carry` / `step`) keeps a KV cache of C = `window` slots (a ring buffer: memory bounded by the
window) or, with window = 0, of C = `max_len` slots. A chunk's queries attend to the cache and to the chunk's own
keys (one library-kernel call with an explicit position mask); the ring then keeps the last C positions. Past
`max_len` positions a window = 0 stream therefore attends to the last `max_len` positions only: it equals the
whole-sequence call with window = max_len (tested), not with window = 0 — set `max_len` above the longest trial.
The carry holds the position counter; a slot with valid=False changes nothing in it.

Logical axis names of the parameters: "tfm_in" (the input width d_in), "tfm_embed" (d_model), "tfm_heads"
(attention heads), "tfm_kv" (head width), "tfm_mlp" (d_ff), "tfm_out" (d_out).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from b2t_jax.models.cell import matmul

__all__ = ["TransformerStack", "check_config", "default_config", "stack_flops"]

# (layer index, residual stream (B, P, d_model) fp32) -> the stream to continue with.
Interlayer = Callable[[int, jax.Array], jax.Array]

_CONFIG_PATH = "config.model.transformer"
_NORM_EPS = 1e-6  # RMSNorm epsilon (Flax's default, written out so that the NumPy reference can use it)


def default_config() -> ml_collections.ConfigDict:
  """`config.model.transformer`: the transformer stack's hyper-parameters (the layer count, output width and the
  MLP dropout come from the decoder: model.n_layers etc.).

  The defaults are the full-size setting: with the baseline's model.n_layers = 5 on the 7168-wide patches (14 x
  512) the GRUDecoder layout holds 41.8M parameters (the stack 30.0M, day layers 11.8M, the head): the range of the
  44.3M-parameter GRU baseline (tests/test_encoders.py checks the count). configs/demo.py sets a demo-size one.
  """
  c = ml_collections.ConfigDict()
  c.d_model = 640  # width of the residual stream
  c.n_heads = 10  # attention heads; the head width d_model / n_heads must be even (RoPE rotates pairs)
  c.d_ff = 1792  # SwiGLU hidden width (~8/3 d_model: the parameters of a 4x GELU MLP)
  c.window = 0  # attention span in patches: t attends to (t - window, t]; 0 = every earlier patch
  c.rope_base = 10000.0  # RoPE frequency base: wavelengths 2*pi .. 2*pi*rope_base patches
  c.max_len = 512  # streaming KV-cache slots if window = 0 (30 s = 372 patches); past it: the last max_len only
  c.attention_dropout = 0.1  # dropout on the attention branch's output before the residual add
  return c


_FIELDS = tuple(default_config().keys())


def check_config(cfg) -> None:
  """Raises ValueError naming `config.model.transformer.<field>` when a value cannot build a stack.
  `cfg` is the sub-config (ConfigDict or mapping)."""
  get = cfg.__getitem__
  missing = [f for f in _FIELDS if f not in cfg]
  if missing:
    raise ValueError(f"{_CONFIG_PATH} lacks {missing} (models/transformer.py:default_config lists them)")

  def bad(field: str, want: str):
    return ValueError(f"{_CONFIG_PATH}.{field}={get(field)!r}: {want}")

  for field in ("d_model", "n_heads", "d_ff", "max_len"):
    if not isinstance(get(field), int) or get(field) < 1:
      raise bad(field, "expected a positive integer")
  if get("d_model") % get("n_heads") or (get("d_model") // get("n_heads")) % 2:
    raise bad("n_heads", f"must divide d_model={get('d_model')} into heads of even width (RoPE rotates pairs)")
  if not isinstance(get("window"), int) or get("window") < 0:
    raise bad("window", "expected 0 (full causal attention) or a positive number of patches")
  if not get("rope_base") > 1.0:
    raise bad("rope_base", "expected a number above 1 (10000 is the usual value)")
  if not 0.0 <= get("attention_dropout") < 1.0:
    raise bad("attention_dropout", "expected a rate in [0, 1)")


def stack_flops(cfg, n_layers: int, d_in: int, d_out: int | None, n_patches: int) -> int:
  """Matmul FLOPs (2 x multiply-adds) of one trial's forward pass through the stack over `n_patches` positions.

  Per position: the input projection 2 d_in D, per layer q/k/v/o 4 x 2 D^2, QK^T and AV 2 x 2 D span_t
  (span_t = min(window, t + 1), or t + 1 with window = 0: the positions actually attended; the XLA kernel also
  multiplies the masked ones), SwiGLU 3 x 2 D d_ff, and the output projection 2 D d_out when there is one.
  Norms, RoPE, softmax and activations are elementwise and left out, as MFU conventions do.
  """
  d, f, w = cfg.d_model, cfg.d_ff, cfg.window
  spans = sum(min(w, t + 1) if w else t + 1 for t in range(n_patches))
  per_layer = (4 * 2 * d * d + 3 * 2 * d * f) * n_patches + 2 * 2 * d * spans
  out = 2 * d * d_out * n_patches if d_out not in (None, d) else 0
  return 2 * d_in * d * n_patches + n_layers * per_layer + out


def _kernel_init(in_axis, out_axis, scale: float = 1.0):
  return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)


def _norm() -> nn.RMSNorm:
  return nn.RMSNorm(
    epsilon=_NORM_EPS,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("tfm_embed",)),
  )


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotary embedding of x (B, S, N, Hd) at integer `positions` (S,): pairs (i, i + Hd/2) rotated by
  positions * base^(-2i/Hd); computed in fp32, returned in x's dtype."""
  half = x.shape[-1] // 2
  inv_freq = base ** (-2.0 * jnp.arange(half, dtype=jnp.float32) / x.shape[-1])
  angle = positions.astype(jnp.float32)[:, None] * inv_freq  # (S, half)
  cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class _Dense(nn.Module):
  """x @ kernel + bias with both matmul operands in `dtype` and the product and bias add in fp32 (so the bias
  gradient is an fp32 sum; nn.Dense would add, and reduce the gradient, in `dtype`)."""

  features: int
  axes: tuple[str, str]  # logical names of the kernel's (in, out) axes; the bias takes the second
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
      "kernel", nn.with_logical_partitioning(_kernel_init(0, 1), self.axes), (x.shape[-1], self.features)
    )
    bias = self.param(
      "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), self.axes[1:]), (self.features,)
    )
    return matmul("...i,io->...o", x, kernel, self.dtype) + bias


class _Block(nn.Module):
  """One pre-norm block; `__call__` over whole sequences, `step` over a chunk against a KV cache."""

  d_model: int
  n_heads: int
  d_ff: int
  window: int
  rope_base: float
  attention_dropout: float
  dropout_rate: float
  residual_scale: float  # variance scale of the projections into the residual stream
  dtype: jnp.dtype

  def setup(self):
    d, n, hd, f = self.d_model, self.n_heads, self.d_model // self.n_heads, self.d_ff
    self.attn_norm = _norm()
    self.w_qkv = self.param(
      "w_qkv",
      nn.with_logical_partitioning(_kernel_init(0, (1, 2, 3)), ("tfm_embed", None, "tfm_heads", "tfm_kv")),
      (d, 3, n, hd),
    )
    self.w_o = self.param(
      "w_o",
      nn.with_logical_partitioning(_kernel_init((0, 1), 2, self.residual_scale), ("tfm_heads", "tfm_kv", "tfm_embed")),
      (n, hd, d),
    )
    self.mlp_norm = _norm()
    self.w_in = self.param(
      "w_in", nn.with_logical_partitioning(_kernel_init(0, (1, 2)), ("tfm_embed", None, "tfm_mlp")), (d, 2, f)
    )
    self.w_down = self.param(
      "w_down", nn.with_logical_partitioning(_kernel_init(0, 1, self.residual_scale), ("tfm_mlp", "tfm_embed")), (f, d)
    )
    self.attn_drop = nn.Dropout(self.attention_dropout)
    self.mlp_drop = nn.Dropout(self.dropout_rate)

  def _qkv(self, h: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q, k (RoPE'd) and v (B, S, N, Hd) in `dtype` of the normed stream h (B, S, D) fp32."""
    qkv = matmul("bsd,dcnk->bscnk", self.attn_norm(h), self.w_qkv, self.dtype)
    q, k = (rope(qkv[:, :, i], positions, self.rope_base).astype(self.dtype) for i in range(2))
    return q, k, qkv[:, :, 2].astype(self.dtype)

  def _rest(self, h: jax.Array, attended: jax.Array, deterministic: bool) -> jax.Array:
    """Output projection, residual, MLP, residual: h (B, S, D) fp32 and attended (B, S, N, Hd) -> (B, S, D) fp32."""
    h = h + self.attn_drop(matmul("bsnk,nkd->bsd", attended, self.w_o, self.dtype), deterministic=deterministic)
    gate_up = matmul("bsd,dcf->bscf", self.mlp_norm(h), self.w_in, self.dtype)
    mlp = matmul("bsf,fd->bsd", nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1], self.w_down, self.dtype)
    return h + self.mlp_drop(mlp, deterministic=deterministic)

  def __call__(self, h: jax.Array, deterministic: bool) -> jax.Array:
    """Whole sequences: h (B, P, D) fp32 at positions 0..P-1 -> (B, P, D) fp32."""
    q, k, v = self._qkv(h, jnp.arange(h.shape[1]))
    window = (self.window - 1, 0) if self.window else None
    attended = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window)
    return self._rest(h, attended, deterministic)

  def step(
    self, h: jax.Array, positions: jax.Array, valid: jax.Array, k_cache: jax.Array, v_cache: jax.Array, slot_pos
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A chunk against the cache: h (B, S, D) fp32 at `positions` (S,), k/v_cache (B, C, N, Hd) holding positions
    `slot_pos` (C,) (-1: empty). Queries see cached and valid chunk keys at positions in (pos - C, pos].
    Returns (h (B, S, D) fp32, the chunk's k and v (B, S, N, Hd) for the cache)."""
    q, k, v = self._qkv(h, positions)
    key_pos = jnp.concatenate([slot_pos, jnp.where(valid, positions, -1)])  # (C + S,), -1 = nothing there
    span = slot_pos.shape[0]
    mask = (key_pos >= 0) & (key_pos <= positions[:, None]) & (key_pos > positions[:, None] - span)
    attended = jax.nn.dot_product_attention(
      q, jnp.concatenate([k_cache, k], axis=1), jnp.concatenate([v_cache, v], axis=1), mask=mask[None, None]
    )
    return self._rest(h, attended, deterministic=True), k, v


def _ring_update(cache: jax.Array, new: jax.Array, take: jax.Array, src: jax.Array) -> jax.Array:
  """The ring buffer (L, B, C, ...) after a chunk's entries new (L, B, S, ...) went in (`_ring_sources`)."""
  moved = jnp.take(new, src, axis=2)
  return jnp.where(take.reshape((1, 1, -1) + (1,) * (cache.ndim - 3)), moved, cache)


def _ring_sources(c: int, n, positions, valid) -> tuple[jax.Array, jax.Array]:
  """Where a chunk goes into a ring of `c` slots that has seen `n` positions: the chunk's valid slots hold positions
  `positions` (S,); slot r keeps the latest position p < n_new with p = r (mod c). Returns (take (c,): slot r is
  written by this chunk, src (c,): the chunk slot that writes it). Index arithmetic only: values move exactly."""
  n_new = n + valid.sum(dtype=jnp.int32)
  slot = jnp.arange(c, dtype=jnp.int32)
  latest = n_new - 1 - jnp.mod(n_new - 1 - slot, c)  # the position slot r holds after the chunk (< 0: none)
  take = latest >= n  # positions n .. n_new - 1 are the chunk's valid slots
  src = jnp.argmax(valid[None, :] & (positions[None, :] == latest[:, None]), axis=1)
  return take, src


class TransformerStack(nn.Module):
  """`n_layers` causal pre-norm transformer blocks over patches (B, P, d_in) -> (B, P, d_out or d_model) in `dtype`.

  Parameters: `embed/{kernel,bias}`, `block_{i}/{attn_norm/scale, w_qkv, w_o, mlp_norm/scale, w_in, w_down}`,
  `final_norm/scale` and, when d_out is set and differs from d_model, `out/{kernel,bias}`.
  """

  n_layers: int
  d_out: int | None
  dropout_rate: float  # MLP-branch dropout
  dtype: jnp.dtype = jnp.float32
  d_model: int = 640
  n_heads: int = 10
  d_ff: int = 1792
  window: int = 0
  rope_base: float = 10000.0
  max_len: int = 512
  attention_dropout: float = 0.1

  @classmethod
  def from_config(
    cls, cfg: ml_collections.ConfigDict, n_layers: int, d_out: int | None, dropout_rate: float, dtype
  ) -> TransformerStack:
    """The stack of `config.model.transformer` (`cfg`), checked first (errors name the field)."""
    check_config(cfg)
    return cls(n_layers, d_out, dropout_rate, dtype, **{f: cfg[f] for f in _FIELDS})

  def setup(self):
    check_config({f: getattr(self, f) for f in _FIELDS})
    if self.n_layers < 1:
      raise ValueError(f"TransformerStack n_layers={self.n_layers}: expected at least one layer")
    self.embed = _Dense(self.d_model, ("tfm_in", "tfm_embed"), self.dtype)
    self.block = [
      _Block(
        self.d_model,
        self.n_heads,
        self.d_ff,
        self.window,
        self.rope_base,
        self.attention_dropout,
        self.dropout_rate,
        1.0 / (2 * self.n_layers),
        self.dtype,
      )
      for _ in range(self.n_layers)
    ]
    self.final_norm = _norm()
    self.out = None
    if self.d_out not in (None, self.d_model):
      self.out = _Dense(self.d_out, ("tfm_embed", "tfm_out"), self.dtype)

  @property
  def cache_len(self) -> int:
    """Streaming KV-cache slots: the window, or max_len with window = 0."""
    return self.window or self.max_len

  def _finish(self, h: jax.Array) -> jax.Array:
    h = self.final_norm(h)
    return (h if self.out is None else self.out(h)).astype(self.dtype)

  def __call__(self, x: jax.Array, *, deterministic: bool, interlayer: Interlayer | None = None) -> jax.Array:
    """x (B, P, d_in) -> (B, P, d_out) in `dtype`; causal. `interlayer(i, h)`, when given, maps the fp32 residual
    stream (B, P, d_model) after block i (un-normalised: pre-norm blocks) for every i."""
    h = self.embed(x)  # the residual stream: fp32 from here on
    for i, block in enumerate(self.block):
      h = block(h, deterministic)
      if interlayer is not None:
        h = interlayer(i, h).astype(jnp.float32)
    return self._finish(h)

  def initial_carry(self, batch: int) -> dict[str, jax.Array]:
    """Empty KV cache: k, v (n_layers, batch, C, n_heads, head width) in `dtype`, slot_pos (C,) int32 = -1
    (the position each slot holds; -1 empty) and n () int32 (positions seen), C = `cache_len`."""
    shape = (self.n_layers, batch, self.cache_len, self.n_heads, self.d_model // self.n_heads)
    return {
      "k": jnp.zeros(shape, self.dtype),
      "v": jnp.zeros(shape, self.dtype),
      "slot_pos": jnp.full((self.cache_len,), -1, jnp.int32),
      "n": jnp.zeros((), jnp.int32),
    }

  def step(
    self, x: jax.Array, valid: jax.Array, carry: dict[str, jax.Array], *, interlayer: Interlayer | None = None
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Streaming (deterministic): x (B, S, d_in) of S slots, valid (S,) bool, carry -> (outputs (B, S, d_out),
    new carry). Valid slots take the next positions in order; an invalid slot changes nothing (its output is
    meaningless). Equals `__call__` on the whole sequence while at most `max_len` positions were seen (window = 0)."""
    valid = jnp.asarray(valid, bool)
    n, slot_pos = carry["n"], carry["slot_pos"]
    positions = n + jnp.cumsum(valid, dtype=jnp.int32) - 1  # an invalid slot repeats the previous position
    h = self.embed(x)
    new_k, new_v = [], []
    for i, block in enumerate(self.block):
      h, k, v = block.step(h, positions, valid, carry["k"][i], carry["v"][i], slot_pos)
      new_k.append(k)
      new_v.append(v)
      if interlayer is not None:
        h = interlayer(i, h).astype(jnp.float32)
    take, src = _ring_sources(self.cache_len, n, positions, valid)
    new_carry = {
      "k": _ring_update(carry["k"], jnp.stack(new_k), take, src),
      "v": _ring_update(carry["v"], jnp.stack(new_v), take, src),
      "slot_pos": jnp.where(take, jnp.take(positions, src), slot_pos),
      "n": n + valid.sum(dtype=jnp.int32),
    }
    return self._finish(h), new_carry
