"""The reference's args.yaml -> b2t_jax config fields, and the text of the imported run's config file."""

from __future__ import annotations

from typing import Any

import ml_collections

from b2t_jax.torch_import.reading import CheckpointImportError

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
_REQUIRED = (
  "model.n_input_features",
  "model.n_units",
  "model.patch_size",
  "model.patch_stride",
  "dataset.sessions",
  "dataset.n_classes",
)


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


def config_overrides(args: dict, kind: str, base: ml_collections.ConfigDict) -> tuple[dict[str, Any], list[str]]:
  """args.yaml -> ({config field: value}, warnings about settings our code does not reproduce). `base` (our
  configs/default.py) gives each field's type."""
  if kind not in ("gru", "triple"):
    raise CheckpointImportError(f"model kind {kind!r}: expected 'gru' or 'triple'")
  required = _REQUIRED + (("model.n_layers",) if kind == "gru" else ())
  values = {f: _get(args, f) for f in required}
  sessions = values["dataset.sessions"]
  if not isinstance(sessions, (list, tuple)) or not sessions or not all(isinstance(s, str) for s in sessions):
    raise CheckpointImportError(
      f"args.yaml: dataset.sessions must be a non-empty list of session names, got {sessions!r}"
    )
  out = {
    "model.kind": kind,
    "data.sessions": tuple(sessions),
    "data.n_features": int(values["model.n_input_features"]),
    "data.feature_pool": 1,
    "model.patch_features": 0,  # the reference patches the day layer outputs directly
    "model.hidden": int(values["model.n_units"]),
    "model.patch_size": int(values["model.patch_size"]),
    "model.patch_stride": int(values["model.patch_stride"]),
    "model.n_classes": int(values["dataset.n_classes"]),
  }
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
    raise CheckpointImportError(
      "args.yaml: dataset.feature_subset is set; b2t_jax reads all feature columns "
      "of the files, so this model's inputs cannot be reproduced"
    )
  if not _get(args, "dataset.data_transforms.smooth_data", True):
    out["aug.smooth_kernel_std"] = 0.0
  if float(_get(args, "weight_decay_day", 0) or 0) != 0:
    warnings.append("weight_decay_day != 0: b2t_jax never decays day layers (only matters for fine-tuning)")
  if _get(args, "lr_scheduler_type", "cosine") != "cosine":
    warnings.append(f"lr_scheduler_type={args['lr_scheduler_type']!r}: b2t_jax uses warm-up + cosine")
  if _get(args, "lr_decay_steps_day", None) not in (None, _get(args, "lr_decay_steps", None)):
    warnings.append("lr_decay_steps_day differs from lr_decay_steps: b2t_jax decays both over optim.decay_steps")
  if _get(args, "model.input_network.n_input_layers", 1) != 1:
    raise CheckpointImportError(
      "args.yaml: model.input_network.n_input_layers != 1 is not supported (one day layer per session)"
    )
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
  lines = [
    f'"""Written by tools/import_torch_checkpoint.py from {source}.',
    "",
    "configs/default.py plus the model sizes, sessions and training settings of the PyTorch run.",
    '"""',
    "",
    "from configs import default",
    "",
    "",
    "def get_config():",
    "  c = default.get_config()",
  ]
  for key, value in overrides.items():
    target = "c." + key
    lines.append(f"  {target} = {value!r}")
  lines.append("  return c")
  return "\n".join(lines) + "\n"


def detect_kind(state_dict: dict[str, Any], args: dict) -> str:
  """'triple' when the state dict has `noise_model.` keys or args.yaml says model.kind: triple, else 'gru'."""
  if _get(args, "model.kind", None) is not None:
    return str(_get(args, "model.kind"))
  return "triple" if any(k.startswith("noise_model.") for k in state_dict) else "gru"
