"""The two decoders: the NEJM `GRUDecoder` (SPEC §3.3) and the `TripleGRUDecoder` (SPEC §3.4)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from b2t_jax.models.frontend import DayFrontEnd
from b2t_jax.models.gru import GRUStack


@jax.custom_vjp
def gradient_reversal(x: jax.Array, lam: jax.Array) -> jax.Array:
  """Identity forward; multiplies the incoming gradient by `-lam` backward. `lam` may be traced."""
  del lam
  return x


def _grl_fwd(x, lam):
  return x, lam


def _grl_bwd(lam, g):
  # lam gets a zero cotangent: it is a schedule value, not something to learn.
  return (-lam * g).astype(g.dtype), jnp.zeros_like(lam)


gradient_reversal.defvjp(_grl_fwd, _grl_bwd)


class _FrontEndMixin:
  def front_end(self, name: str) -> DayFrontEnd:
    m = self.cfg
    return DayFrontEnd(n_days=m.n_days, n_features=m.n_input_features, patch_size=m.patch_size,
                       patch_stride=m.patch_stride, dropout_rate=m.input_dropout,
                       patch_features=m.patch_features, dtype=self.dtype, name=name)

  def stack(self, n_layers: int, hidden: int, name: str, hidden_axis: str = "hidden") -> GRUStack:
    return GRUStack(n_layers=n_layers, hidden=hidden, dropout_rate=self.cfg.rnn_dropout, dtype=self.dtype,
                    unroll=self.cfg.gru_unroll, hidden_axis=hidden_axis,
                    backward=self.cfg.gru_backward, remat=self.cfg.gru_remat,
                    wavefront=self.cfg.gru_wavefront, name=name)

  def head(self, name: str) -> nn.Dense:
    return nn.Dense(self.cfg.n_classes, dtype=self.dtype, name=name)


class GRUDecoder(nn.Module, _FrontEndMixin):
  """Day layers -> patches -> n_layers x GRU(H) -> Dense(n_classes). Returns fp32 logits (B, P, C)."""

  cfg: Any
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, day, *, train: bool = False, mode: str = "inference", grl_lambda=None):
    del mode, grl_lambda  # one output in every mode
    h = self.front_end("frontend")(x, day, deterministic=not train)
    h = self.stack(self.cfg.n_layers, self.cfg.hidden, "gru")(h, deterministic=not train)
    return self.head("out")(h).astype(jnp.float32)


class NoiseModel(nn.Module, _FrontEndMixin):
  """Own front end -> GRU stack of width size*features (no projection) -> the noise estimate (B, P, size*F)."""

  cfg: Any
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, day, *, train: bool):
    h = self.front_end("frontend")(x, day, deterministic=not train)
    return self.stack(self.cfg.noise_layers, h.shape[-1], "gru", "noise_hidden")(h, deterministic=not train)


class CleanSpeechModel(nn.Module, _FrontEndMixin):
  """Own front end; subtracts the noise estimate, then GRU stack -> Dense -> clean logits."""

  cfg: Any
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, day, noise, *, train: bool):
    x_clean = self.front_end("frontend")(x, day, deterministic=not train)
    denoised = x_clean - noise.astype(x_clean.dtype)
    h = self.stack(self.cfg.clean_layers, self.cfg.hidden, "gru")(denoised, deterministic=not train)
    return self.head("out")(h).astype(jnp.float32)


class NoisySpeechModel(nn.Module, _FrontEndMixin):
  """GRU stack -> Dense on the (gradient-reversed) noise: an adversary that tries to read speech from noise."""

  cfg: Any
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, noise, *, train: bool):
    h = self.stack(self.cfg.noisy_layers, self.cfg.hidden, "gru")(noise, deterministic=not train)
    return self.head("out")(h).astype(jnp.float32)


class TripleGRUDecoder(nn.Module):
  """Noise + clean + adversarial noisy decoders (SPEC §3.4).

  mode='inference' -> clean logits (B, P, C); mode='full' -> (clean_logits, noisy_logits, noise).
  """

  cfg: Any
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, day, *, train: bool = False, mode: str = "inference", grl_lambda=None):
    if mode not in ("inference", "full"):
      raise ValueError(f"unknown mode {mode!r}: use 'inference' or 'full'")
    noise = NoiseModel(self.cfg, self.dtype, name="noise_model")(x, day, train=train)
    clean_logits = CleanSpeechModel(self.cfg, self.dtype, name="clean_model")(x, day, noise, train=train)
    if mode == "inference" and not self.is_initializing():
      return clean_logits
    lam = jnp.asarray(self.cfg.grl_lambda if grl_lambda is None else grl_lambda, jnp.float32)
    noisy_logits = NoisySpeechModel(self.cfg, self.dtype, name="noisy_model")(
        gradient_reversal(noise, lam), train=train)
    if mode == "inference":  # initialising: build every sub-model, return what inference returns
      return clean_logits
    return clean_logits, noisy_logits, noise


def model_hparams(config: ml_collections.ConfigDict) -> ml_collections.FrozenConfigDict:
  """`config.model` plus the sizes it derives from the data config (days, features per bin)."""
  hp = config.model.to_dict()
  hp["n_days"] = len(config.data.sessions)
  if config.data.n_features % config.data.feature_pool:
    raise ValueError(f"config.data.feature_pool={config.data.feature_pool} must divide "
                     f"config.data.n_features={config.data.n_features}")
  hp["n_input_features"] = config.data.n_features // config.data.feature_pool
  if hp["patch_features"] < 0:
    raise ValueError(f"config.model.patch_features={hp['patch_features']}: use 0 (off, SPEC) or the width of "
                     "the learned projection before patching")
  return ml_collections.FrozenConfigDict(hp)


def create_model(config: ml_collections.ConfigDict) -> nn.Module:
  """Builds the decoder named by `config.model.kind` ('gru' or 'triple') with its compute dtype."""
  hp = model_hparams(config)
  dtype = jnp.dtype(hp.dtype)
  if hp.kind == "gru":
    return GRUDecoder(hp, dtype)
  if hp.kind == "triple":
    return TripleGRUDecoder(hp, dtype)
  raise ValueError(f"config.model.kind={hp.kind!r}: expected 'gru' or 'triple'")
