"""The two decoders: the NEJM `GRUDecoder` (SPEC §3.3) and the `TripleGRUDecoder` (SPEC §3.4).

Each decoder defines its topology once (`_decode` of every sub-model) and runs it two ways: over whole trials
(`__call__`, training and evaluation) and a few patch slots at a time from carried stack states (the streaming
pair `initial_carry` / `step`, with `frames` for the day layers: `decoding/streaming.py` cuts the patches).
The stacks are `config.model.encoder`'s kind (GRU, transformer or Mamba-2: `encoders.py`); nothing here depends
on which. The speech decoder's head follows `config.model.targets` (`b2t_jax/diphones.py`): phonemes (SPEC), or
diphones whose phoneme marginals are what inference and streaming return (41 classes whatever the targets), with
`both` adding an auxiliary phoneme head for training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from b2t_jax import diphones
from b2t_jax.models.encoders import IntermediateCTC, make_stack, stream_width
from b2t_jax.models.frontend import DayFrontEnd

# Runs a stack on its input: (stack, x, interlayer=None) -> (outputs, new carry or None).
StackRun = Callable[..., tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class ModelHParams:
  """The model's hyper-parameters: `config.model` (configs/default.py documents each) plus two sizes derived
  from `config.data`. Frozen and hashable: modules hold it as an attribute."""

  kind: str
  dtype: str
  n_classes: int
  patch_size: int
  patch_stride: int
  patch_features: int
  input_dropout: float
  rnn_dropout: float
  hidden: int
  n_layers: int
  noise_layers: int
  clean_layers: int
  noisy_layers: int
  grl_lambda: float
  gru_unroll: int
  gru_backward: str
  gru_remat: bool
  gru_wavefront: bool
  encoder: str  # gru | transformer | mamba2 (models/encoders.py)
  transformer: ml_collections.FrozenConfigDict  # config.model.transformer
  mamba2: ml_collections.FrozenConfigDict  # config.model.mamba2
  intermediate_ctc: tuple[int, ...]  # layers of the speech stack followed by an intermediate CTC head
  targets: str  # phoneme | diphone | both (b2t_jax/diphones.py)
  diphone_head: str  # factored | flat: how a diphone head is parametrised (b2t_jax/diphones.py)
  n_days: int  # len(config.data.sessions)
  n_input_features: int  # config.data.n_features // config.data.feature_pool


_DERIVED = ("n_days", "n_input_features")
_SUB_CONFIGS = ("transformer", "mamba2")


def model_hparams(config: ml_collections.ConfigDict) -> ModelHParams:
  """`config.model` plus the sizes it derives from the data config (days, features per bin)."""
  given = config.model.to_dict()
  for name in _SUB_CONFIGS:
    if name in given:
      given[name] = ml_collections.FrozenConfigDict(given[name])
  if "intermediate_ctc" in given:
    given["intermediate_ctc"] = tuple(int(i) for i in given["intermediate_ctc"])
  known = {f.name for f in dataclasses.fields(ModelHParams)} - set(_DERIVED)
  if set(given) != known:
    raise ValueError(
      f"config.model has unknown fields {sorted(set(given) - known)} and lacks "
      f"{sorted(known - set(given))} (models/decoders.py:ModelHParams lists them)"
    )
  if config.data.n_features % config.data.feature_pool:
    raise ValueError(
      f"config.data.feature_pool={config.data.feature_pool} must divide config.data.n_features={config.data.n_features}"
    )
  if given["patch_features"] < 0:
    raise ValueError(
      f"config.model.patch_features={given['patch_features']}: use 0 (off, SPEC) or the width of "
      "the learned projection before patching"
    )
  return ModelHParams(
    **given, n_days=len(config.data.sessions), n_input_features=config.data.n_features // config.data.feature_pool
  )


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


def _whole(deterministic: bool) -> StackRun:
  """Runs a stack over whole sequences from its initial state."""
  return lambda stack, x, interlayer=None: (stack(x, deterministic=deterministic, interlayer=interlayer), None)


def _stepping(valid: jax.Array, carry: Any) -> StackRun:
  """Advances a stack over a few slots from `carry` (inference)."""
  return lambda stack, x, interlayer=None: stack.step(x, valid, carry, interlayer=interlayer)


class _Parts:
  """The building blocks every sub-model takes from `self.hp`."""

  def front_end(self) -> DayFrontEnd:
    m = self.hp
    return DayFrontEnd(
      n_days=m.n_days,
      n_features=m.n_input_features,
      patch_size=m.patch_size,
      patch_stride=m.patch_stride,
      dropout_rate=m.input_dropout,
      patch_features=m.patch_features,
      dtype=self.dtype,
    )

  def stack(self, n_layers: int, width: int, hidden_axis: str = "hidden", keep_width: bool = False) -> nn.Module:
    """A `config.model.encoder` stack (`encoders.make_stack`): `width` is a GRU's hidden width, or the output width
    another kind projects back to when `keep_width`."""
    return make_stack(self.hp, n_layers, width, keep_width=keep_width, hidden_axis=hidden_axis, dtype=self.dtype)

  def head(self, n_classes: int | None = None, zero: bool = False) -> nn.Dense:
    """Dense(n_classes) (default: the phoneme classes); `zero`: the kernel starts at zero (a correction term)."""
    kernel_init = nn.initializers.zeros_init() if zero else nn.linear.default_kernel_init
    return nn.Dense(
      self.hp.n_classes if n_classes is None else n_classes,
      dtype=self.dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init, ("hidden", "classes")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("classes",)),
    )


class _SpeechDecoder(nn.Module, _Parts):
  """Own front end -> patches (minus a noise estimate, when given) -> encoder stack (a GRU of width `hidden`)
  -> Dense; intermediate CTC heads after the layers `model.intermediate_ctc` names (phoneme-level whatever the
  targets: they condition the stream on phoneme posteriors).

  The head `out` predicts `model.targets`' classes: 41 phonemes, or 1 + 40 * 40 diphones (diphones.py); a
  `factored` diphone head adds `diphone_base`, the phoneme logits each diphone's context term `out` is added to. With
  `both`, `phoneme_out` is a second, phoneme head on the same stream, trained by an auxiliary CTC only.
  """

  hp: ModelHParams
  dtype: jnp.dtype = jnp.float32
  layers_field: ClassVar[str]  # the ModelHParams field with this decoder's stack depth

  def setup(self):
    self.frontend = self.front_end()
    # 'gru' is the stack's name whatever its kind: checkpoints and the PyTorch import address `gru/...`.
    self.gru = self.stack(getattr(self.hp, self.layers_field), self.hp.hidden)
    self.factored = diphones.is_factored(self.hp.targets, self.hp.diphone_head)
    self.out = self.head(diphones.head_classes(self.hp.targets, self.hp.n_classes), zero=self.factored)
    if self.factored:
      self.diphone_base = self.head()
    if self.hp.targets == "both":
      self.phoneme_out = self.head()
    width = stream_width(self.hp, self.hp.hidden)
    self.ictc = [IntermediateCTC(self.hp.n_classes, width, self.dtype) for _ in self.hp.intermediate_ctc]

  def _decode(self, patches: jax.Array, run: StackRun, noise: jax.Array | None = None):
    """(heads (`_heads`), new carry or None, intermediate CTC logits) of `patches` (B, P, patch width)."""
    if noise is not None:
      patches = patches - noise.astype(patches.dtype)
    intermediate: list[jax.Array] = []
    h, carry = run(self.gru, patches, self._interlayer(intermediate))
    return self._heads(h), carry, tuple(intermediate)

  def _heads(self, h: jax.Array) -> dict[str, jax.Array]:
    """fp32 outputs of the head(s) on the stack's output: 'logits' (B, P, n_classes) always (for diphone targets
    the phoneme log-probabilities marginalised from the diphones), 'diphone_logits' (B, P, 1 + K^2) for
    diphone/both, 'phoneme_logits' (B, P, n_classes) of the auxiliary head for both."""
    out = self.out(h).astype(jnp.float32)
    if self.hp.targets == "phoneme":
      return {"logits": out}
    if self.factored:
      out = diphones.factored_logits(self.diphone_base(h), out, self.hp.n_classes)
    heads = {"logits": diphones.marginal_log_probs(out, self.hp.n_classes), "diphone_logits": out}
    if self.hp.targets == "both":
      heads["phoneme_logits"] = self.phoneme_out(h).astype(jnp.float32)
    return heads

  def _interlayer(self, collected: list):
    """The stack's `interlayer`: after each layer of `model.intermediate_ctc`, its head's logits are collected
    and its posteriors condition the stream."""
    if not self.hp.intermediate_ctc:
      return None
    heads = dict(zip(self.hp.intermediate_ctc, self.ictc))

    def interlayer(i: int, h: jax.Array) -> jax.Array:
      if i not in heads:
        return h
      logits, h = heads[i](h)
      collected.append(logits)
      return h

    return interlayer


class GRUDecoder(_SpeechDecoder):
  """Day layers -> patches -> n_layers-deep encoder stack (SPEC: GRU(H)) -> Dense(n_classes, or the diphones);
  fp32 logits."""

  layers_field = "n_layers"

  def __call__(self, x, day, *, train: bool = False, mode: str = "inference", grl_lambda=None):
    """mode='inference' -> logits (B, P, C) (diphone targets: the marginal log-probabilities); mode='full'
    (training) -> {'logits', 'intermediate' (the intermediate CTC heads' logits, a tuple), and for diphone targets
    'diphone_logits' ('both': also 'phoneme_logits')}."""
    del grl_lambda  # no adversarial branch
    heads, _, intermediate = self._decode(self.frontend(x, day, deterministic=not train), _whole(not train))
    return {**heads, "intermediate": intermediate} if mode == "full" else heads["logits"]

  def frames(self, x: jax.Array, day: jax.Array) -> dict[str, jax.Array]:
    """Inference frames (B, T, F') of each front end, by name; patches of them are `step`'s input."""
    return {"frontend": self.frontend.frames(x, day)}

  def initial_carry(self, batch: int = 1) -> dict[str, jax.Array]:
    """The stack state before a trial's first patch: {stack: its carry (a GRU: (n_layers, batch, H))}."""
    return {"gru": self.gru.initial_carry(batch)}

  def step(self, patches: dict[str, jax.Array], valid: jax.Array, carry: dict[str, jax.Array]):
    """patches {front end: (B, S, patch width)} of S slots, valid (S,), carry -> (new carry, logits (B, S, C)).
    An invalid slot leaves every state as it was; its logits are meaningless."""
    heads, h, _ = self._decode(patches["frontend"], _stepping(valid, carry["gru"]))
    return {"gru": h}, heads["logits"]


class NoiseModel(nn.Module, _Parts):
  """Own front end -> stack of output width size*features (a GRU that wide; other kinds project back to it) ->
  the noise estimate (B, P, size*F)."""

  hp: ModelHParams
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    m = self.hp
    self.frontend = self.front_end()
    width = m.patch_size * (m.patch_features or m.n_input_features)
    self.gru = self.stack(m.noise_layers, width, "noise_hidden", keep_width=True)

  def _decode(self, patches: jax.Array, run: StackRun):
    return run(self.gru, patches)

  def __call__(self, x, day, *, train: bool):
    return self._decode(self.frontend(x, day, deterministic=not train), _whole(not train))[0]


class CleanSpeechModel(_SpeechDecoder):
  """Own front end; subtracts the noise estimate, then encoder stack -> Dense -> clean heads (`_heads`)."""

  layers_field = "clean_layers"

  def __call__(self, x, day, noise, *, train: bool):
    return self._decode(self.frontend(x, day, deterministic=not train), _whole(not train), noise)[0]


class NoisySpeechModel(nn.Module, _Parts):
  """Encoder stack -> Dense on the (gradient-reversed) noise: an adversary that tries to read speech from noise.

  Phoneme-level whatever `model.targets`: its only job is to push phoneme information out of the noise estimate
  (a diphone's current phoneme is a phoneme, and its previous one the phoneme before), it is dropped at inference,
  and a 1601-way head would add 1560 * hidden parameters to a branch nobody decodes."""

  hp: ModelHParams
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.gru = self.stack(self.hp.noisy_layers, self.hp.hidden)
    self.out = self.head()

  def __call__(self, noise, *, train: bool):
    return self.out(self.gru(noise, deterministic=not train)).astype(jnp.float32)


class TripleGRUDecoder(nn.Module):
  """Noise + clean + adversarial noisy decoders (SPEC §3.4).

  mode='inference' -> clean logits (B, P, C) (diphone targets: their phoneme marginals); mode='full' -> {'logits':
  clean logits, 'intermediate': the clean stack's intermediate CTC logits, 'noisy_logits' (phoneme-level), 'noise',
  and the clean heads' 'diphone_logits' / 'phoneme_logits' as `targets` asks}. The noisy
  (adversarial) branch is training-only: streaming (`step`) runs the noise and clean models.
  """

  hp: ModelHParams
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.noise_model = NoiseModel(self.hp, self.dtype)
    self.clean_model = CleanSpeechModel(self.hp, self.dtype)
    self.noisy_model = NoisySpeechModel(self.hp, self.dtype)

  def _decode(self, patches: dict[str, jax.Array], runs: dict[str, StackRun]):
    """The inference topology: noise stack, clean = clean patches - noise, clean stack, head. Returns (clean
    heads (`_SpeechDecoder._heads`), noise, new carries, the clean stack's intermediate CTC logits)."""
    noise, h_noise = self.noise_model._decode(patches["noise"], runs["noise"])
    clean, h_clean, intermediate = self.clean_model._decode(patches["clean"], runs["clean"], noise)
    return clean, noise, {"noise": h_noise, "clean": h_clean}, intermediate

  def __call__(self, x, day, *, train: bool = False, mode: str = "inference", grl_lambda=None):
    if mode not in ("inference", "full"):
      raise ValueError(f"unknown mode {mode!r}: use 'inference' or 'full'")
    patches = {
      "noise": self.noise_model.frontend(x, day, deterministic=not train),
      "clean": self.clean_model.frontend(x, day, deterministic=not train),
    }
    clean, noise, _, intermediate = self._decode(patches, {"noise": _whole(not train), "clean": _whole(not train)})
    if mode == "inference" and not self.is_initializing():
      return clean["logits"]
    lam = jnp.asarray(self.hp.grl_lambda if grl_lambda is None else grl_lambda, jnp.float32)
    noisy_logits = self.noisy_model(gradient_reversal(noise, lam), train=train)
    if mode == "inference":  # initialising: build every sub-model, return what inference returns
      return clean["logits"]
    return {**clean, "intermediate": intermediate, "noisy_logits": noisy_logits, "noise": noise}

  def frames(self, x: jax.Array, day: jax.Array) -> dict[str, jax.Array]:
    """Inference frames (B, T, F') of each front end, by name; patches of them are `step`'s input."""
    return {"noise": self.noise_model.frontend.frames(x, day), "clean": self.clean_model.frontend.frames(x, day)}

  def initial_carry(self, batch: int = 1) -> dict[str, jax.Array]:
    """The stack states before a trial's first patch: {stack: its carry}."""
    return {"noise": self.noise_model.gru.initial_carry(batch), "clean": self.clean_model.gru.initial_carry(batch)}

  def step(self, patches: dict[str, jax.Array], valid: jax.Array, carry: dict[str, jax.Array]):
    """As GRUDecoder.step; the clean logits are emitted."""
    runs = {name: _stepping(valid, carry[name]) for name in ("noise", "clean")}
    clean, _, new_carry, _ = self._decode(patches, runs)
    return new_carry, clean["logits"]


def create_model(config: ml_collections.ConfigDict) -> nn.Module:
  """Builds the decoder named by `config.model.kind` ('gru' or 'triple') with its compute dtype."""
  hp = model_hparams(config)
  dtype = jnp.dtype(hp.dtype)
  if hp.kind == "gru":
    return GRUDecoder(hp, dtype)
  if hp.kind == "triple":
    return TripleGRUDecoder(hp, dtype)
  raise ValueError(f"config.model.kind={hp.kind!r}: expected 'gru' or 'triple'")
