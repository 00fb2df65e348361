"""Streaming inference: 20 ms bins in, phoneme logits out, chunk by chunk, equal to the offline forward pass.

The offline path (eval) smooths a whole trial with a centred 9-tap Gaussian (zero "same" padding), applies the
day layer to every bin, cuts patches (size 14, stride 4) and runs the GRU stacks. Streaming reproduces it with
fixed-shape steps of `chunk` bins (`config.stream.chunk_bins`, a multiple of the patch stride):

- smoothing: the last `taps - 1` raw bins are carried, so a step that receives raw bins [r, r + chunk) emits the
  smoothed frames [r - lag, r + chunk - lag), lag = taps // 2 (= 4 bins, 80 ms). Before the first bin the
  carry is zeros, which is exactly the offline left padding.
- day layer + patches: the last `keep` day-transformed frames are carried (`keep` >= size - stride, chosen so
  that every step's buffer starts on a patch boundary); each step then completes exactly chunk / stride
  patches. Patch slots whose index is < 0 (the first steps, before 14 real frames exist) or >= the trial's
  patch count (the flush) are masked: they leave every GRU state untouched and emit nothing.
- GRU stacks: each layer's hidden state is carried (initialised from the learned h0).
- end of trial (`finish`): the missing bins of the last chunk and `lag` more are zeros, which is the offline
  right padding; zero chunks are fed until every one of the trial's `floor((T - 14) / 4) + 1` patches is out.

A patch p (frames 4p .. 4p + 13) is emitted by the step that receives raw bin 4p + 17, i.e. the decoder's
algorithmic latency is the smoothing lag plus the patch span. The model itself (models/decoders.py) supplies
the day layers (`frames`), the GRU states (`initial_carry`) and the step over patch slots (`step`); this module
only knows the streaming geometry. For model kind 'triple' the noise and clean front ends run side by side
and the clean logits (inference mode) are emitted; for diphone targets (`model.targets`) the model's step emits
their marginal phoneme log-probabilities, so every row has `model.n_classes` columns whatever the targets.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from b2t_jax.data.augment import gaussian_kernel
from b2t_jax.data.batching import pool_features
from b2t_jax.models.decoders import create_model, model_hparams
from b2t_jax.patching import n_patches
from b2t_jax.steps import merge_log_probs

# p_end while the trial is still running: no patch index reaches it.
_OPEN_END = np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class StreamGeometry:
  """Static shapes of one streaming step (hashable: it keys the jit cache)."""

  chunk: int  # raw bins per step
  taps: tuple  # smoothing taps (odd count; (1.0,) when smoothing is off)
  size: int  # patch size in frames
  stride: int  # patch stride in frames
  keep: int  # day-transformed frames carried between steps
  n_features: int  # features per bin entering the model

  @property
  def lag(self) -> int:
    return len(self.taps) // 2

  @property
  def slots(self) -> int:
    return self.chunk // self.stride

  @property
  def first_patch(self) -> int:
    """Patch index of slot 0 in step 0 (negative: the first slots are before the trial)."""
    return -(self.lag + self.keep) // self.stride


def geometry(config: ml_collections.ConfigDict, chunk: int | None = None) -> StreamGeometry:
  """The step geometry of `config`; `chunk` overrides config.stream.chunk_bins."""
  m, a = config.model, config.aug
  chunk = config.stream.chunk_bins if chunk is None else chunk
  if chunk <= 0 or chunk % m.patch_stride:
    raise ValueError(
      f"streaming chunk of {chunk} bins: must be a positive multiple of "
      f"config.model.patch_stride={m.patch_stride} (config.stream.chunk_bins)"
    )
  taps = (
    tuple(float(t) for t in gaussian_kernel(a.smooth_kernel_std, a.smooth_kernel_size, a.smooth_threshold))
    if a.smooth_kernel_std > 0
    else (1.0,)
  )
  lag = len(taps) // 2
  keep = max(m.patch_size - m.patch_stride, 0)
  while (keep + lag) % m.patch_stride:  # align every step's frame buffer to a patch start
    keep += 1
  return StreamGeometry(
    chunk=chunk,
    taps=taps,
    size=m.patch_size,
    stride=m.patch_stride,
    keep=keep,
    n_features=model_hparams(config).n_input_features,
  )


# ------------------------------------------------------------------------------------------- pure functions


def _frames(model: nn.Module, params: Any, bins: jax.Array, day: jax.Array) -> dict[str, jax.Array]:
  """(n, F) smoothed bins -> {front end: (n, F')} inference frames (the model's day layers, projection)."""
  frames = model.apply({"params": params}, bins[None], day[None], method="frames")
  return {name: y[0] for name, y in frames.items()}


def init_state(model: nn.Module, params: Any, geo: StreamGeometry) -> dict:
  """Zero smoothing and frame buffers (one per front end of `model`); GRU states from the model's h0."""
  shapes = jax.eval_shape(
    lambda p: _frames(model, p, jnp.zeros((geo.chunk, geo.n_features)), jnp.zeros((), jnp.int32)), params
  )
  return {
    "raw": jnp.zeros((len(geo.taps) - 1, geo.n_features), jnp.float32),
    "frames": {name: jnp.zeros((geo.keep, s.shape[-1]), jnp.float32) for name, s in shapes.items()},
    "h": model.apply({"params": params}, 1, method="initial_carry"),
  }


def stream_step(
  model: nn.Module,
  params: Any,
  state: dict,
  chunk: jax.Array,
  first: jax.Array,
  end: jax.Array,
  day: jax.Array,
  *,
  geo: StreamGeometry,
) -> tuple[dict, jax.Array, jax.Array]:
  """One step: `chunk` (geo.chunk, F) raw bins of day `day` -> (new state, logits (slots, C), valid (slots,)).

  Slot s is patch `first + s`; it is valid (updates the state, its logits are real) when 0 <= it < `end`.
  """
  n = geo.chunk
  ext = jnp.concatenate([state["raw"], chunk.astype(jnp.float32)], axis=0)
  # Same sum, same order as augment.smooth, so the smoothed frames match the offline ones bit for bit.
  smoothed = sum(w * ext[k : k + n] for k, w in enumerate(geo.taps[::-1]))
  patch_ids = first + jnp.arange(geo.slots)
  valid = (patch_ids >= 0) & (patch_ids < end)
  patches, frames = {}, {}
  for name, y in _frames(model, params, smoothed, day).items():
    buf = jnp.concatenate([state["frames"][name].astype(y.dtype), y], axis=0)
    # The layout of frontend.patchify: patch p is frames [stride * p, stride * p + size), flattened.
    patches[name] = jnp.stack(
      [buf[o : o + geo.size].reshape(-1) for o in range(0, geo.slots * geo.stride, geo.stride)]
    )[None]
    frames[name] = buf[buf.shape[0] - geo.keep :]
  h, logits = model.apply({"params": params}, patches, valid, state["h"], method="step")
  new_state = {"raw": ext[ext.shape[0] - state["raw"].shape[0] :], "frames": frames, "h": h}
  return new_state, logits[0].astype(jnp.float32), valid


def step_fn(config: ml_collections.ConfigDict, model: nn.Module, geo: StreamGeometry):
  """`stream_step` as the decoder runs it: (params, state, chunk, first, end, day) -> (state, logits, valid); for
  an ensemble (config.train.n_models > 1, stacked params and states) every member steps on the same chunk and
  their log-probabilities are merged. Jitted by StreamingDecoder, and compiled for a TPU by b2t_jax/aot.py."""
  step = functools.partial(stream_step, model, geo=geo)
  if config.train.n_models == 1:
    return step
  members = jax.vmap(step, in_axes=(0, 0, None, None, None, None), out_axes=(0, 0, None))

  def ensemble_step(params, state, chunk, first, end, day):
    state, logits, valid = members(params, state, chunk, first, end, day)
    return state, merge_log_probs(logits, axis=0), valid

  return ensemble_step


# ------------------------------------------------------------------------------------------- host wrapper


class StreamingDecoder:
  """Feeds one trial's bins as they arrive and returns the new logit rows; `finish()` ends the trial.

  decoder = StreamingDecoder(config, params, day=3)
  for bins in source:                    # any number of (n, data.n_features) rows per call
    rows = decoder.feed(bins)            # (k, n_classes) logits of the patches completed so far
  rows = decoder.finish()                # the rest; the decoder is then reset for the next trial

  Concatenated, the rows equal the offline eval-mode logits of the trial (first floor((T-14)/4)+1 rows); for an
  ensemble (config.train.n_models > 1, stacked params) its merged log-probabilities (steps.merge_log_probs).
  """

  def __init__(self, config: ml_collections.ConfigDict, params: Any, day: int, chunk_bins: int | None = None):
    self.kind = config.model.kind
    if self.kind not in ("gru", "triple"):
      raise ValueError(f"config.model.kind={self.kind!r}: expected 'gru' or 'triple'")
    n_days = len(config.data.sessions)
    if not 0 <= day < n_days:
      raise ValueError(f"day {day} is outside config.data.sessions (0..{n_days - 1})")
    self.geo = geometry(config, chunk_bins)
    self.pool = config.data.feature_pool
    self.raw_features = config.data.n_features
    self.size, self.stride = config.model.patch_size, config.model.patch_stride
    self.model = create_model(config)
    self.n_classes = config.model.n_classes
    self.day = np.int32(day)
    # One trial is a batch of one: run on a single device even when `params` come sharded over a mesh.
    self.params = jax.device_put(params, jax.devices()[0])
    self.n_models = config.train.n_models
    self._step = jax.jit(step_fn(config, self.model, self.geo), donate_argnums=1)
    self.reset()

  def reset(self) -> None:
    """Starts a new trial (same day)."""
    init = functools.partial(init_state, self.model, geo=self.geo)
    self.state = init(self.params) if self.n_models == 1 else jax.vmap(init)(self.params)
    self.steps = 0  # steps run in this trial
    self.bins = 0  # raw bins received in this trial
    self._pending = np.zeros((0, self.geo.n_features), np.float32)

  def _run(self, chunk: np.ndarray, end: int) -> np.ndarray:
    first = self.geo.first_patch + self.steps * self.geo.slots
    self.state, logits, valid = self._step(self.params, self.state, chunk, np.int32(first), np.int32(end), self.day)
    self.steps += 1
    logits, valid = jax.device_get((logits, valid))
    return logits[valid]

  def feed(self, bins: np.ndarray) -> np.ndarray:
    """(n, data.n_features) raw bins -> logits (k, C) of the patches they complete (k may be 0)."""
    bins = np.asarray(bins, np.float32)
    if bins.ndim != 2 or bins.shape[1] != self.raw_features:
      raise ValueError(f"expected bins of shape (n, {self.raw_features}) (config.data.n_features), got {bins.shape}")
    self.bins += bins.shape[0]
    self._pending = np.concatenate([self._pending, pool_features(bins, self.pool)], axis=0)
    out = []
    while self._pending.shape[0] >= self.geo.chunk:
      chunk, self._pending = self._pending[: self.geo.chunk], self._pending[self.geo.chunk :]
      out.append(self._run(chunk, _OPEN_END))
    return np.concatenate(out) if out else np.zeros((0, self._n_classes()), np.float32)

  def finish(self) -> np.ndarray:
    """Ends the trial: zero-pads like the offline smoothing, emits the remaining rows, resets."""
    total = max(int(n_patches(self.bins, self.size, self.stride)), 0)
    emitted = max(self.geo.first_patch + self.steps * self.geo.slots, 0)
    out = []
    while emitted < total:
      chunk = np.zeros((self.geo.chunk, self.geo.n_features), np.float32)
      chunk[: self._pending.shape[0]] = self._pending
      self._pending = self._pending[:0]
      out.append(self._run(chunk, total))
      emitted = self.geo.first_patch + self.steps * self.geo.slots
    self.reset()
    return np.concatenate(out) if out else np.zeros((0, self._n_classes()), np.float32)

  def _n_classes(self) -> int:
    return self.n_classes
