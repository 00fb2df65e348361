"""The reference's state-dict layout (see the package docstring) <-> our params pytree, checked key by key."""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from b2t_jax.torch_import.reading import CheckpointImportError, strip_prefixes


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
    return {
      **_front_layout("", hp.n_days, f),
      **_stack_layout("", hp.n_layers, patch_in, hp.hidden),
      **_head_layout("", hp.hidden, hp.n_classes),
    }
  if hp.kind == "triple":
    return {
      **_front_layout("noise_model.", hp.n_days, f),
      **_stack_layout("noise_model.", hp.noise_layers, patch_in, patch_in),
      **_front_layout("clean_model.", hp.n_days, f),
      **_stack_layout("clean_model.", hp.clean_layers, patch_in, hp.hidden),
      **_head_layout("clean_model.", hp.hidden, hp.n_classes),
      **_stack_layout("noisy_model.", hp.noisy_layers, patch_in, hp.hidden),
      **_head_layout("noisy_model.", hp.hidden, hp.n_classes),
    }
  raise CheckpointImportError(f"model kind {hp.kind!r}: expected 'gru' or 'triple'")


def _natural(key: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def check_layout(state_dict: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]], source: str) -> None:
  """Raises one CheckpointImportError naming every missing, unexpected and mis-shaped key."""
  missing = sorted(set(expected) - set(state_dict), key=_natural)
  unexpected = sorted(set(state_dict) - set(expected), key=_natural)
  bad = [
    f"{k}: {tuple(state_dict[k].shape)}, expected {expected[k]}"
    for k in sorted(expected, key=_natural)
    if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k])
  ]
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
      "cell": {
        "w_hh": _gate_kernel(sd[f"{g}weight_hh_l{k}"], hidden),
        "b_hh": sd[f"{g}bias_hh_l{k}"].reshape(3, hidden),
      },
    }
  return out


def _front_params(sd, prefix: str, n_days: int) -> dict:
  return {
    "day_weights": np.stack([sd[f"{prefix}day_weights.{d}"] for d in range(n_days)]),
    "day_biases": np.concatenate([sd[f"{prefix}day_biases.{d}"] for d in range(n_days)], axis=0),
  }


def _head_params(sd, prefix: str) -> dict:
  return {"kernel": np.ascontiguousarray(sd[f"{prefix}out.weight"].T), "bias": sd[f"{prefix}out.bias"]}


def state_dict_to_params(
  state_dict: dict[str, np.ndarray], config: ml_collections.ConfigDict, source: str = "checkpoint"
) -> dict:
  """A PyTorch state dict (numpy arrays, prefixes stripped) -> our params pytree for `config`'s model,
  checked key by key against the layout in this module's docstring and leaf by leaf against our model."""
  from b2t_jax.models.decoders import model_hparams  # noqa: PLC0415 - keeps module import light
  from b2t_jax.summary import abstract_params  # noqa: PLC0415

  hp = model_hparams(config)
  sd = {k: np.asarray(v, np.float32) for k, v in strip_prefixes(state_dict).items()}
  check_layout(sd, expected_layout(hp), source)
  if hp.kind == "gru":
    params = {
      "frontend": _front_params(sd, "", hp.n_days),
      "gru": _stack_params(sd, "", hp.n_layers, hp.hidden),
      "out": _head_params(sd, ""),
    }
  else:
    width = hp.patch_size * hp.n_input_features
    params = {
      "noise_model": {
        "frontend": _front_params(sd, "noise_model.", hp.n_days),
        "gru": _stack_params(sd, "noise_model.", hp.noise_layers, width),
      },
      "clean_model": {
        "frontend": _front_params(sd, "clean_model.", hp.n_days),
        "gru": _stack_params(sd, "clean_model.", hp.clean_layers, hp.hidden),
        "out": _head_params(sd, "clean_model."),
      },
      "noisy_model": {
        "gru": _stack_params(sd, "noisy_model.", hp.noisy_layers, hp.hidden),
        "out": _head_params(sd, "noisy_model."),
      },
    }
  # Our model's own layout is the final word: a renamed or reshaped parameter must fail here, not at restore.
  want = nn.unbox(abstract_params(config))
  got_paths = {jax.tree_util.keystr(p): a.shape for p, a in jax.tree_util.tree_leaves_with_path(params)}
  want_paths = {jax.tree_util.keystr(p): a.shape for p, a in jax.tree_util.tree_leaves_with_path(want)}
  if got_paths != want_paths:
    diff = sorted(set(got_paths.items()) ^ set(want_paths.items()))
    raise CheckpointImportError(f"internal: converted params differ from the model's layout: {diff[:10]}")
  return jax.tree.map(jnp.asarray, params)


def _torch_kernel(w: np.ndarray) -> np.ndarray:
  """Ours (in, 3, H) -> torch (3H, in) with rows [r; z; n]: the inverse of `_gate_kernel`."""
  return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)


def _module_state(p: dict, prefix: str, n_layers: int) -> dict[str, np.ndarray]:
  """One sub-module's entries in torch's order: its own parameter h0 first, then its child modules in registration
  order: day layers, GRU (per layer: weight_ih, weight_hh, bias_ih, bias_hh), head. That is the order of
  `state_dict()` and `named_parameters()` of the reference's GRUDecoder, and so of its optimizer's parameter
  indices."""
  sd = {f"{prefix}h0": p["gru"]["h0"].reshape(1, 1, -1)}
  if "frontend" in p:
    sd.update({f"{prefix}day_weights.{d}": w for d, w in enumerate(p["frontend"]["day_weights"])})
    sd.update({f"{prefix}day_biases.{d}": b[None, :] for d, b in enumerate(p["frontend"]["day_biases"])})
  for k in range(n_layers):
    layer = p["gru"][f"layer_{k}"]
    sd[f"{prefix}gru.weight_ih_l{k}"] = _torch_kernel(layer["w_ih"])
    sd[f"{prefix}gru.weight_hh_l{k}"] = _torch_kernel(layer["cell"]["w_hh"])
    sd[f"{prefix}gru.bias_ih_l{k}"] = layer["b_ih"].reshape(-1)
    sd[f"{prefix}gru.bias_hh_l{k}"] = layer["cell"]["b_hh"].reshape(-1)
  if "out" in p:
    sd[f"{prefix}out.weight"] = np.ascontiguousarray(p["out"]["kernel"].T)
    sd[f"{prefix}out.bias"] = p["out"]["bias"]
  return sd


def params_to_state_dict(params: Any, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """Our params pytree (or any tree of its structure, e.g. Adam moments) for `config`'s model -> the reference's
  state dict (fp32 numpy arrays, torch's key order, no prefix): the inverse of `state_dict_to_params`, exact."""
  from b2t_jax.models.decoders import model_hparams  # noqa: PLC0415 - keeps module import light

  hp = model_hparams(config)
  p = jax.tree.map(lambda a: np.array(jax.device_get(a), np.float32), params)  # writable copies (torch.from_numpy)
  if hp.kind == "gru":
    sd = _module_state(p, "", hp.n_layers)
  elif hp.kind == "triple":
    sd = {
      **_module_state(p["noise_model"], "noise_model.", hp.noise_layers),
      **_module_state(p["clean_model"], "clean_model.", hp.clean_layers),
      **_module_state(p["noisy_model"], "noisy_model.", hp.noisy_layers),
    }
  else:
    raise CheckpointImportError(f"model kind {hp.kind!r}: expected 'gru' or 'triple'")
  check_layout(sd, expected_layout(hp), "the exported state dict")  # our own layout: a failure here is a bug
  return sd
