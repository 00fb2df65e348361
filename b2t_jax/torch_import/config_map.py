"""The imported run's config: its model kind and the text of its config file. Which config fields the run's
args.yaml sets is b2t_jax/reference_args.py's table, the one that training from a YAML uses too."""

from __future__ import annotations

from typing import Any


def kind_from_keys(state_dict: dict[str, Any]) -> str:
  """'triple' when the state dict has `noise_model.` keys, else 'gru' (args.yaml's `model.kind` or
  `adversarial.enabled`, when present, decide instead: reference_args.build)."""
  return "triple" if any(k.startswith("noise_model.") for k in state_dict) else "gru"


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
    lines.append(f"  c.{key} = {value!r}")
  lines.append("  return c")
  return "\n".join(lines) + "\n"
