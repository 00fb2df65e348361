"""PyTorch checkpoints -> our params, config and orbax checkpoint (SPEC §6).

A reference checkpoint is `torch.save({'model_state_dict', 'optimizer_state_dict', 'scheduler_state_dict',
'val_PER', 'val_loss'})` with `args.yaml` (the training arguments, OmegaConf YAML) in the same folder. Keys may
carry `_orig_mod.` (torch.compile) or `module.` (DataParallel) prefixes; both are stripped.

GRUDecoder state dict (the reference's layout; H = model.n_units, F = model.n_input_features,
S = model.patch_size, D = len(dataset.sessions), L = model.n_layers, C = dataset.n_classes):

  h0 (1, 1, H); day_weights.{0..D-1} (F, F); day_biases.{0..D-1} (1, F)
  gru.weight_ih_l0 (3H, S*F); gru.weight_ih_l{1..L-1} (3H, H); gru.weight_hh_l{0..L-1} (3H, H)
  gru.bias_ih_l{k}, gru.bias_hh_l{k} (3H,); out.weight (C, H); out.bias (C,)

TripleGRUDecoder state dict (our definition: three sub-modules, each laid out like the GRUDecoder above, i.e.
what a torch module holding `noise_model`, `clean_model`, `noisy_model` attributes built from `nn.GRU`,
`nn.Linear`, `nn.ParameterList` and an `h0` parameter would save; W = S*F is the noise GRU's width):

  noise_model.day_weights.{d} (F, F); noise_model.day_biases.{d} (1, F); noise_model.h0 (1, 1, W)
  noise_model.gru.{weight_ih,weight_hh}_l{k} (3W, W); noise_model.gru.{bias_ih,bias_hh}_l{k} (3W,)
  clean_model.day_weights.{d}; clean_model.day_biases.{d}; clean_model.h0 (1, 1, H)
  clean_model.gru.* (layer 0 input W, then H); clean_model.out.weight (C, H); clean_model.out.bias (C,)
  noisy_model.h0 (1, 1, H); noisy_model.gru.* (layer 0 input W, then H); noisy_model.out.{weight,bias}

Its args.yaml has the reference's keys plus `model.kind: triple` and, optionally, `model.noise_layers`,
`model.clean_layers`, `model.noisy_layers` (defaults 2, 3, 2); `model.n_units` is the clean/noisy width and
`model.n_layers` is ignored.

Conversions (rows of every GRU tensor are [r; z; n], like our gate axis): day weights are used as `x @ W` on
both sides (no transpose), day biases (1, F) are concatenated, `h0` (1, 1, H) -> (H,), `weight_ih_l{k}`
(3H, in) -> `.T.reshape(in, 3, H)`, `weight_hh_l{k}` the same, biases (3H,) -> (3, H), `out.weight` (C, H) ->
its transpose. The GRU's h0 is shared by every layer of a stack, in both codes.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

PREFIXES = ("_orig_mod.", "module.")
ARGS_FILE = "args.yaml"
# Defaults of the triple's layer counts when its args.yaml does not name them (SPEC §3.4).
TRIPLE_LAYER_DEFAULTS = {"noise_layers": 2, "clean_layers": 3, "noisy_layers": 2}


class CheckpointImportError(ValueError):
  """A checkpoint or its args.yaml cannot be converted; the message names the file, key or field."""


# ----------------------------------------------------------------------------------------------- reading


def _safe_numpy_globals() -> list:
  """Numpy scalar reconstruction, allowed in `weights_only` loads: the reference stores `val_loss` as
  `np.mean(...)`, a numpy float64, which the plain weights-only unpickler refuses. These globals only
  rebuild a scalar from its dtype and raw bytes; nothing else is unpickled."""
  core = getattr(np, "_core", None) or np.core
  scalar = core.multiarray.scalar
  dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_)]
  # Files written under numpy 1.x name the module `numpy.core.multiarray`.
  return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *dtypes]


def load_torch_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Reads a reference checkpoint (or a bare state dict) with `torch.load(weights_only=True)`.

  Returns (state dict as fp32 numpy arrays with prefixes stripped, {'val_PER', 'val_loss'} when present).
  """
  try:
    import torch  # noqa: PLC0415 - torch is optional: only this import path needs it
  except ImportError as e:
    raise ImportError("importing a PyTorch checkpoint needs torch (CPU is enough): "
                      "pip install torch, or install b2t_jax with its [test] extra") from e
  if not os.path.isfile(path):
    raise CheckpointImportError(f"{path}: no such checkpoint file")
  try:
    with torch.serialization.safe_globals(_safe_numpy_globals()):
      blob = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - torch raises several types for bad files; all mean the same here
    hint = ("it holds Python objects other than tensors and plain values, which are not unpickled from an "
            "untrusted file" if "Weights only load failed" in str(e)
            else "is it a complete file written by torch.save?")
    raise CheckpointImportError(f"{path}: cannot read as a PyTorch checkpoint ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:300]}); {hint}") from e
  if not isinstance(blob, dict):
    raise CheckpointImportError(f"{path}: expected a dict (a checkpoint or a state dict), got {type(blob).__name__}")
  sd = blob.get("model_state_dict", blob)
  if not isinstance(sd, dict):
    raise CheckpointImportError(f"{path}: 'model_state_dict' is a {type(sd).__name__}, not a state dict")
  arrays = {}
  for key, value in sd.items():
    if not isinstance(value, torch.Tensor):
      raise CheckpointImportError(f"{path}: state-dict entry {key!r} is a {type(value).__name__}, not a tensor")
    arrays[key] = value.detach().to(torch.float32).cpu().numpy()
  meta = {}
  for k in ("val_PER", "val_loss"):
    if blob is not sd and k in blob:
      try:
        meta[k] = float(blob[k])
      except (TypeError, ValueError):  # informational only: a missing or odd value must not block the import
        pass
  return strip_prefixes(arrays), meta


def strip_prefixes(state_dict: dict[str, Any]) -> dict[str, Any]:
  """Drops leading `_orig_mod.` / `module.` (in any order and number) from every key."""
  out = {}
  for key, value in state_dict.items():
    k = key
    while k.startswith(PREFIXES):
      k = next(k[len(p):] for p in PREFIXES if k.startswith(p))
    if k in out:
      raise CheckpointImportError(f"keys {key!r} and another one both become {k!r} once prefixes are stripped")
    out[k] = value
  return out


def read_args_yaml(path: str) -> dict[str, Any]:
  """The reference's args.yaml as a dict (plain YAML as OmegaConf writes it)."""
  import yaml  # noqa: PLC0415 - only the import tool needs YAML
  if not os.path.isfile(path):
    raise CheckpointImportError(f"{path}: missing; the reference writes args.yaml beside its checkpoint "
                                "(pass --args=PATH if it lives elsewhere)")
  with open(path) as f:
    args = yaml.safe_load(f)
  if not isinstance(args, dict):
    raise CheckpointImportError(f"{path}: expected a YAML mapping, got {type(args).__name__}")
  return args


# ------------------------------------------------------------------------------------------ args -> config

# (args.yaml path, config field); every entry is optional and keeps our default when absent.
_ARG_FIELDS = (
    ("model.rnn_dropout", "model.rnn_dropout"),
    ("model.input_network.input_layer_dropout", "model.input_dropout"),
    ("model.noise_layers", "model.noise_layers"),
    ("model.clean_layers", "model.clean_layers"),
    ("model.noisy_layers", "model.noisy_layers"),
    ("dataset.batch_size", "data.batch_size"),
    ("dataset.days_per_batch", "data.days_per_batch"),
    ("dataset.seed", "data.seed"),
    ("dataset.data_transforms.white_noise_std", "aug.white_noise_std"),
    ("dataset.data_transforms.constant_offset_std", "aug.constant_offset_std"),
    ("dataset.data_transforms.random_walk_std", "aug.random_walk_std"),
    ("dataset.data_transforms.static_gain_std", "aug.static_gain_std"),
    ("dataset.data_transforms.random_cut", "aug.random_cut"),
    ("dataset.data_transforms.smooth_kernel_std", "aug.smooth_kernel_std"),
    ("dataset.data_transforms.smooth_kernel_size", "aug.smooth_kernel_size"),
    ("seed", "seed"),
    ("num_training_batches", "train.num_steps"),
    ("lr_max", "optim.lr_peak"),
    ("lr_min", "optim.lr_min"),
    ("lr_decay_steps", "optim.decay_steps"),
    ("lr_warmup_steps", "optim.warmup_steps"),
    ("lr_max_day", "optim.day_lr_peak"),
    ("lr_min_day", "optim.day_lr_min"),
    ("lr_warmup_steps_day", "optim.day_warmup_steps"),
    ("beta0", "optim.b1"),
    ("beta1", "optim.b2"),
    ("epsilon", "optim.eps"),
    ("weight_decay", "optim.weight_decay"),
    ("grad_norm_clip_value", "optim.grad_clip_norm"),
)
# Fields the model's shapes depend on: required, since a wrong default would only fail at restore.
_REQUIRED = ("model.n_input_features", "model.n_units", "model.patch_size", "model.patch_stride",
             "dataset.sessions", "dataset.n_classes")


def _get(args: dict, dotted: str, default=KeyError):
  node = args
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      if default is KeyError:
        raise CheckpointImportError(f"args.yaml: field {dotted!r} is missing (needed for the model's shapes)")
      return default
    node = node[part]
  return node


def _coerce(value, like, field: str):
  """Casts a YAML value to the type of our config field (YAML writes 2 for 2.0)."""
  if isinstance(like, bool):
    return bool(value)
  if isinstance(like, (int, float)):
    try:
      return type(like)(value)
    except (TypeError, ValueError) as e:
      raise CheckpointImportError(f"args.yaml: {field} = {value!r} is not a number") from e
  return value


def config_overrides(args: dict, kind: str, base: ml_collections.ConfigDict
                     ) -> tuple[dict[str, Any], list[str]]:
  """args.yaml -> ({config field: value}, warnings about settings our code does not reproduce). `base` (our
  configs/default.py) gives each field's type."""
  if kind not in ("gru", "triple"):
    raise CheckpointImportError(f"model kind {kind!r}: expected 'gru' or 'triple'")
  required = _REQUIRED + (("model.n_layers",) if kind == "gru" else ())
  values = {f: _get(args, f) for f in required}
  sessions = values["dataset.sessions"]
  if not isinstance(sessions, (list, tuple)) or not sessions or not all(isinstance(s, str) for s in sessions):
    raise CheckpointImportError(f"args.yaml: dataset.sessions must be a non-empty list of session names, "
                                f"got {sessions!r}")
  out = {"model.kind": kind,
         "data.sessions": tuple(sessions),
         "data.n_features": int(values["model.n_input_features"]),
         "data.feature_pool": 1,
         "model.patch_features": 0,   # the reference patches the day layer outputs directly
         "model.hidden": int(values["model.n_units"]),
         "model.patch_size": int(values["model.patch_size"]),
         "model.patch_stride": int(values["model.patch_stride"]),
         "model.n_classes": int(values["dataset.n_classes"])}
  if kind == "gru":
    out["model.n_layers"] = int(values["model.n_layers"])
  for src, dst in _ARG_FIELDS:
    v = _get(args, src, None)
    if v is not None:
      section, field = dst.split(".") if "." in dst else (None, dst)
      like = base[section][field] if section else base[field]
      out[dst] = _coerce(v, like, src)
  warnings = []
  if _get(args, "dataset.feature_subset", None) is not None:
    raise CheckpointImportError("args.yaml: dataset.feature_subset is set; b2t_jax reads all feature columns "
                                "of the files, so this model's inputs cannot be reproduced")
  if not _get(args, "dataset.data_transforms.smooth_data", True):
    out["aug.smooth_kernel_std"] = 0.0
  if float(_get(args, "weight_decay_day", 0) or 0) != 0:
    warnings.append("weight_decay_day != 0: b2t_jax never decays day layers (only matters for fine-tuning)")
  if _get(args, "lr_scheduler_type", "cosine") != "cosine":
    warnings.append(f"lr_scheduler_type={args['lr_scheduler_type']!r}: b2t_jax uses warm-up + cosine")
  if _get(args, "lr_decay_steps_day", None) not in (None, _get(args, "lr_decay_steps", None)):
    warnings.append("lr_decay_steps_day differs from lr_decay_steps: b2t_jax decays both over "
                    "optim.decay_steps")
  if _get(args, "model.input_network.n_input_layers", 1) != 1:
    raise CheckpointImportError("args.yaml: model.input_network.n_input_layers != 1 is not supported "
                                "(one day layer per session)")
  return out, warnings


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """Sets 'section.field' (or top-level 'field') values on a config."""
  for key, value in overrides.items():
    if "." in key:
      section, field = key.split(".")
      config[section][field] = value
    else:
      config[key] = value
  return config


def config_source(overrides: dict[str, Any], source: str) -> str:
  """The text of a config file: configs/default.py plus `overrides`."""
  lines = [f'"""Written by tools/import_torch_checkpoint.py from {source}.',
           "",
           "configs/default.py plus the model sizes, sessions and training settings of the PyTorch run.",
           '"""', "", "from configs import default", "", "", "def get_config():",
           "  c = default.get_config()"]
  for key, value in overrides.items():
    target = "c." + key
    lines.append(f"  {target} = {value!r}")
  lines.append("  return c")
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ state dict -> params


def _stack_layout(prefix: str, n_layers: int, d_in: int, hidden: int) -> dict[str, tuple[int, ...]]:
  shapes = {}
  for k in range(n_layers):
    shapes[f"{prefix}gru.weight_ih_l{k}"] = (3 * hidden, d_in if k == 0 else hidden)
    shapes[f"{prefix}gru.weight_hh_l{k}"] = (3 * hidden, hidden)
    shapes[f"{prefix}gru.bias_ih_l{k}"] = (3 * hidden,)
    shapes[f"{prefix}gru.bias_hh_l{k}"] = (3 * hidden,)
  shapes[f"{prefix}h0"] = (1, 1, hidden)
  return shapes


def _front_layout(prefix: str, n_days: int, n_features: int) -> dict[str, tuple[int, ...]]:
  shapes = {}
  for d in range(n_days):
    shapes[f"{prefix}day_weights.{d}"] = (n_features, n_features)
    shapes[f"{prefix}day_biases.{d}"] = (1, n_features)
  return shapes


def _head_layout(prefix: str, hidden: int, n_classes: int) -> dict[str, tuple[int, ...]]:
  return {f"{prefix}out.weight": (n_classes, hidden), f"{prefix}out.bias": (n_classes,)}


def expected_layout(hp) -> dict[str, tuple[int, ...]]:
  """Every key of the PyTorch state dict of the model described by `hp` (`model_hparams(config)`) -> shape."""
  f, patch_in = hp.n_input_features, hp.patch_size * hp.n_input_features
  if hp.kind == "gru":
    return {**_front_layout("", hp.n_days, f), **_stack_layout("", hp.n_layers, patch_in, hp.hidden),
            **_head_layout("", hp.hidden, hp.n_classes)}
  if hp.kind == "triple":
    return {**_front_layout("noise_model.", hp.n_days, f),
            **_stack_layout("noise_model.", hp.noise_layers, patch_in, patch_in),
            **_front_layout("clean_model.", hp.n_days, f),
            **_stack_layout("clean_model.", hp.clean_layers, patch_in, hp.hidden),
            **_head_layout("clean_model.", hp.hidden, hp.n_classes),
            **_stack_layout("noisy_model.", hp.noisy_layers, patch_in, hp.hidden),
            **_head_layout("noisy_model.", hp.hidden, hp.n_classes)}
  raise CheckpointImportError(f"model kind {hp.kind!r}: expected 'gru' or 'triple'")


def _natural(key: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def check_layout(state_dict: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]], source: str) -> None:
  """Raises one CheckpointImportError naming every missing, unexpected and mis-shaped key."""
  missing = sorted(set(expected) - set(state_dict), key=_natural)
  unexpected = sorted(set(state_dict) - set(expected), key=_natural)
  bad = [f"{k}: {tuple(state_dict[k].shape)}, expected {expected[k]}" for k in sorted(expected, key=_natural)
         if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k])]
  if not (missing or unexpected or bad):
    return
  parts = [f"{source} does not match the model described by its args.yaml / config:"]
  if missing:
    parts.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
  if unexpected:
    parts.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
  if bad:
    parts.append(f"  mis-shaped keys ({len(bad)}): " + "; ".join(bad))
  raise CheckpointImportError("\n".join(parts))


def _gate_kernel(w: np.ndarray, hidden: int) -> np.ndarray:
  """torch (3H, in) with rows [r; z; n] -> ours (in, 3, H)."""
  return np.ascontiguousarray(w.T).reshape(w.shape[1], 3, hidden)


def _stack_params(sd, prefix: str, n_layers: int, hidden: int) -> dict:
  out = {"h0": sd[f"{prefix}h0"].reshape(hidden)}
  for k in range(n_layers):
    g = f"{prefix}gru."
    out[f"layer_{k}"] = {
        "w_ih": _gate_kernel(sd[f"{g}weight_ih_l{k}"], hidden),
        "b_ih": sd[f"{g}bias_ih_l{k}"].reshape(3, hidden),
        "cell": {"w_hh": _gate_kernel(sd[f"{g}weight_hh_l{k}"], hidden),
                 "b_hh": sd[f"{g}bias_hh_l{k}"].reshape(3, hidden)}}
  return out


def _front_params(sd, prefix: str, n_days: int) -> dict:
  return {"day_weights": np.stack([sd[f"{prefix}day_weights.{d}"] for d in range(n_days)]),
          "day_biases": np.concatenate([sd[f"{prefix}day_biases.{d}"] for d in range(n_days)], axis=0)}


def _head_params(sd, prefix: str) -> dict:
  return {"kernel": np.ascontiguousarray(sd[f"{prefix}out.weight"].T), "bias": sd[f"{prefix}out.bias"]}


def state_dict_to_params(state_dict: dict[str, np.ndarray], config: ml_collections.ConfigDict,
                         source: str = "checkpoint") -> dict:
  """A PyTorch state dict (numpy arrays, prefixes stripped) -> our params pytree for `config`'s model,
  checked key by key against the layout in this module's docstring and leaf by leaf against our model."""
  from b2t_jax.models.decoders import model_hparams  # noqa: PLC0415 - keeps module import light
  from b2t_jax.summary import abstract_params  # noqa: PLC0415
  hp = model_hparams(config)
  sd = {k: np.asarray(v, np.float32) for k, v in strip_prefixes(state_dict).items()}
  check_layout(sd, expected_layout(hp), source)
  if hp.kind == "gru":
    params = {"frontend": _front_params(sd, "", hp.n_days), "gru": _stack_params(sd, "", hp.n_layers, hp.hidden),
              "out": _head_params(sd, "")}
  else:
    width = hp.patch_size * hp.n_input_features
    params = {
        "noise_model": {"frontend": _front_params(sd, "noise_model.", hp.n_days),
                        "gru": _stack_params(sd, "noise_model.", hp.noise_layers, width)},
        "clean_model": {"frontend": _front_params(sd, "clean_model.", hp.n_days),
                        "gru": _stack_params(sd, "clean_model.", hp.clean_layers, hp.hidden),
                        "out": _head_params(sd, "clean_model.")},
        "noisy_model": {"gru": _stack_params(sd, "noisy_model.", hp.noisy_layers, hp.hidden),
                        "out": _head_params(sd, "noisy_model.")}}
  # Our model's own layout is the final word: a renamed or reshaped parameter must fail here, not at restore.
  want = nn.unbox(abstract_params(config))
  got_paths = {jax.tree_util.keystr(p): a.shape for p, a in jax.tree_util.tree_leaves_with_path(params)}
  want_paths = {jax.tree_util.keystr(p): a.shape for p, a in jax.tree_util.tree_leaves_with_path(want)}
  if got_paths != want_paths:
    diff = sorted(set(got_paths.items()) ^ set(want_paths.items()))
    raise CheckpointImportError(f"internal: converted params differ from the model's layout: {diff[:10]}")
  return jax.tree.map(jnp.asarray, params)


# ------------------------------------------------------------------------------------------- the whole tool


def detect_kind(state_dict: dict[str, Any], args: dict) -> str:
  """'triple' when the state dict has `noise_model.` keys or args.yaml says model.kind: triple, else 'gru'."""
  if _get(args, "model.kind", None) is not None:
    return str(_get(args, "model.kind"))
  return "triple" if any(k.startswith("noise_model.") for k in state_dict) else "gru"


def import_checkpoint(checkpoint: str, out: str, base_config: ml_collections.ConfigDict,
                      args_path: str | None = None) -> dict[str, Any]:
  """Converts `checkpoint` (+ its args.yaml) into OUT/config.py (configs/default.py, i.e. `base_config`, plus
  the run's settings) and an orbax checkpoint under OUT: step 0 in both 'best' and 'checkpoints', with a
  fresh optimizer state. Returns a summary dict for printing."""
  from b2t_jax import checkpoint as ckpt_lib  # noqa: PLC0415 - orbax is heavy; only the tool needs it
  from b2t_jax.optim import guarded_optimizer  # noqa: PLC0415
  from b2t_jax.steps import TrainState  # noqa: PLC0415

  if not os.path.isfile(checkpoint):
    raise CheckpointImportError(f"{checkpoint}: no such checkpoint file")
  for sub in ("best", "checkpoints"):
    d = os.path.join(out, sub)
    if os.path.isdir(d) and os.listdir(d):
      raise CheckpointImportError(f"{d} already holds checkpoints; pass an empty --out directory")
  args_path = args_path or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), ARGS_FILE)
  args = read_args_yaml(args_path)
  state_dict, meta = load_torch_checkpoint(checkpoint)
  kind = detect_kind(state_dict, args)
  overrides, warnings = config_overrides(args, kind, base_config)
  config = apply_overrides(copy.deepcopy(base_config), overrides)
  params = state_dict_to_params(state_dict, config, source=checkpoint)

  tx = guarded_optimizer(config.optim)
  # Same key derivation as steps.create_train_state, so a fine-tune from here is seeded like a fresh run.
  _, base_key = jax.random.split(jax.random.PRNGKey(config.seed))
  state = TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params), rng=base_key)
  os.makedirs(out, exist_ok=True)
  ckpts = ckpt_lib.Checkpoints(out)
  ckpts.maybe_save_best(state, meta.get("val_PER", float("nan")), meta.get("val_loss", float("nan")))
  ckpts.save_latest(state, force=True)
  ckpts.wait()
  ckpts.close()
  config_path = os.path.join(out, "config.py")
  with open(config_path, "w") as f:
    f.write(config_source(overrides, os.path.abspath(checkpoint)))
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
  return {"kind": kind, "config": config_path, "workdir": out, "params": n_params, "warnings": warnings, **meta}
