"""Reading a PyTorch checkpoint (weights only, numpy scalars allowed) and its args.yaml."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DataParallel key prefixes, stripped on reading
ARGS_FILE = "args.yaml"


class CheckpointImportError(ValueError):
  """A checkpoint or its args.yaml cannot be converted; the message names the file, key or field."""


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
    raise ImportError(
      "importing a PyTorch checkpoint needs torch (CPU is enough): "
      "pip install torch, or install b2t_jax with its [test] extra"
    ) from e
  if not os.path.isfile(path):
    raise CheckpointImportError(f"{path}: no such checkpoint file")
  try:
    with torch.serialization.safe_globals(_safe_numpy_globals()):
      blob = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - torch raises several types for bad files; all mean the same here
    hint = (
      "it holds Python objects other than tensors and plain values, which are not unpickled from an untrusted file"
      if "Weights only load failed" in str(e)
      else "is it a complete file written by torch.save?"
    )
    raise CheckpointImportError(
      f"{path}: cannot read as a PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:300]}); {hint}"
    ) from e
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
      k = next(k[len(p) :] for p in PREFIXES if k.startswith(p))
    if k in out:
      raise CheckpointImportError(f"keys {key!r} and another one both become {k!r} once prefixes are stripped")
    out[k] = value
  return out


def read_args_yaml(path: str) -> dict[str, Any]:
  """The reference's args.yaml as a dict (reference_args.read_args), its errors as CheckpointImportError."""
  from b2t_jax import reference_args  # noqa: PLC0415 - keeps this module free of the config machinery

  if not os.path.isfile(path):
    raise CheckpointImportError(
      f"{path}: missing; the reference writes args.yaml beside its checkpoint (pass --args=PATH if it lives elsewhere)"
    )
  try:
    return reference_args.read_args(path)
  except reference_args.ReferenceArgsError as e:
    raise CheckpointImportError(str(e)) from e
