"""PyTorch checkpoints -> our params, config and orbax checkpoint (SPEC §6), and back (`export.py`: a workdir ->
the reference's checkpoint folder, tools/export_torch_checkpoint.py).

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

Its args.yaml has the reference's keys plus `model.kind: triple` (or the TPU variant's `adversarial.enabled: true`)
and, optionally, `model.noise_layers`, `model.clean_layers`, `model.noisy_layers` (defaults 2, 3, 2);
`model.n_units` is the clean/noisy width and `model.n_layers` is ignored. Which config field each args.yaml key
sets is b2t_jax/reference_args.py's table (the one configs/reference_yaml.py trains from).

Conversions (rows of every GRU tensor are [r; z; n], like our gate axis): day weights are used as `x @ W` on
both sides (no transpose), day biases (1, F) are concatenated, `h0` (1, 1, H) -> (H,), `weight_ih_l{k}`
(3H, in) -> `.T.reshape(in, 3, H)`, `weight_hh_l{k}` the same, biases (3H,) -> (3, H), `out.weight` (C, H) ->
its transpose. The GRU's h0 is shared by every layer of a stack, in both codes.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from b2t_jax import reference_args
from b2t_jax.torch_import.config_map import config_source, kind_from_keys
from b2t_jax.torch_import.reading import ARGS_FILE, CheckpointImportError, load_torch_checkpoint, read_args_yaml
from b2t_jax.torch_import.weights import params_to_state_dict, state_dict_to_params

__all__ = ["CheckpointImportError", "import_checkpoint", "params_to_state_dict", "state_dict_to_params"]


def import_checkpoint(
  checkpoint: str, out: str, base_config: ml_collections.ConfigDict, args_path: str | None = None
) -> dict[str, Any]:
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
  try:  # the weights are trained: settings b2t_jax would not reproduce in training are warnings here
    mapping = reference_args.build(
      args, args_path, base_config, strict=False, default_kind=kind_from_keys(state_dict), paths=False
    )
  except reference_args.ReferenceArgsError as e:
    raise CheckpointImportError(str(e)) from e
  kind, overrides, warnings = mapping.kind, mapping.overrides, mapping.warnings
  config = reference_args.apply(copy.deepcopy(base_config), overrides)
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
