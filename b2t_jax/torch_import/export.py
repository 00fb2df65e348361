"""A b2t_jax workdir -> the reference's checkpoint folder: the inverse of `import_checkpoint`.

OUT/checkpoint/best_checkpoint is what the reference trainer's `save_model_checkpoint` writes:
`torch.save({'model_state_dict', 'optimizer_state_dict', 'scheduler_state_dict', 'val_PER', 'val_loss'})`.
- model_state_dict: the GRUDecoder's keys and shapes (SPEC §6; the triple model: the layout the importer reads),
  fp32, in torch's own key order; with `key_prefix='_orig_mod.'` as a torch.compile'd model saves them (the
  reference trainer compiles its model and resumes into the compiled one; its evaluate_model.py strips either).
- optimizer_state_dict: the reference's AdamW (three groups: GRU/head biases without decay; day layers at
  lr_max_day, weight_decay_day 0; the rest) holding our Adam moments and step counts, per parameter (a day layer
  that never trained has no state, as in torch); scheduler_state_dict: its LambdaLR at our step, with our
  learning rates. Both are built by torch's own classes, so they load into the reference's optimizer as saved.
- val_PER, val_loss: the best checkpoint's (NaN when only a 'latest' checkpoint exists).
OUT/checkpoint/args.yaml: the run's settings in the released file's layout (reference_args.to_args).
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from b2t_jax import reference_args
from b2t_jax.torch_import.reading import ARGS_FILE
from b2t_jax.torch_import.weights import params_to_state_dict

CHECKPOINT_DIR = "checkpoint"  # the reference's checkpoint_dir under output_dir
CHECKPOINT_FILE = "best_checkpoint"
COMPILED_PREFIX = "_orig_mod."  # keys of a torch.compile'd module's state dict
ENCODERS = ("gru",)  # config.model.encoder values the reference's model has
TARGETS = ("phoneme",)  # config.model.targets values the reference's model has


class CheckpointExportError(ValueError):
  """A workdir that the reference's checkpoint cannot hold; the message names the config field."""


def refusals(config: ml_collections.ConfigDict) -> list[str]:
  """Why `config`'s model cannot be written as a reference checkpoint (empty: it can)."""
  m, out = config.model, []
  if m.kind not in reference_args.KINDS:
    out.append(f"config.model.kind={m.kind!r}: the reference's layouts are {', '.join(reference_args.KINDS)}")
  if m.patch_features != 0:
    out.append(
      f"config.model.patch_features={m.patch_features}: the reference patches the day layers' outputs directly "
      "(no learned projection before patching); export a model trained with patch_features=0"
    )
  if config.data.feature_pool != 1:
    out.append(
      f"config.data.feature_pool={config.data.feature_pool}: the reference reads every feature column; "
      "export a model trained with feature_pool=1"
    )
  if config.train.n_models > 1:
    out.append(
      f"config.train.n_models={config.train.n_models}: an ensemble; a reference checkpoint holds one model "
      "(train that member alone with config.seed=seed+k to export it)"
    )
  # Fields other model families add; an older config has neither (a GRU on phonemes).
  if "encoder" in m and m.encoder not in ENCODERS:
    out.append(f"config.model.encoder={m.encoder!r}: the reference's model is a GRU; only encoder='gru' exports")
  if "targets" in m and m.targets not in TARGETS:
    out.append(f"config.model.targets={m.targets!r}: the reference's model predicts phonemes; only 'phoneme' exports")
  return out


def _first(tree: Any, cls: type) -> Any:
  found = [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, cls)) if isinstance(x, cls)]
  if len(found) != 1:
    raise CheckpointExportError(f"internal: expected one {cls.__name__} in the optimizer state, found {len(found)}")
  return found[0]


def _merged(a: Any, b: Any) -> Any:
  """`a` with its masked-out leaves (another optimizer group's) taken from `b`."""
  return jax.tree.map(
    lambda x, y: y if isinstance(x, optax.MaskedNode) else x, a, b, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
  )


def _day_steps(count: Any, kind: str) -> dict[str, int]:
  """State-dict key of each day layer -> its Adam step count (DayAdamState.count: (n_days,) per day leaf)."""
  fronts = (
    {"": count["frontend"]}
    if kind == "gru"
    else {f"{m}.": count[m]["frontend"] for m in ("noise_model", "clean_model")}
  )
  out = {}
  for prefix, front in fronts.items():
    for name in ("day_weights", "day_biases"):
      for d, c in enumerate(np.asarray(jax.device_get(front[name]))):
        out[f"{prefix}{name}.{d}"] = int(c)
  return out


def reference_group(name: str) -> str:
  """The reference's AdamW group of a state-dict key: 'bias' (GRU and head biases: no decay), 'day_layer'
  (own learning rate, weight_decay_day) or 'other'; the rule of its trainer's `create_optimizer`."""
  if "gru.bias" in name or "out.bias" in name:
    return "bias"
  return "day_layer" if "day_" in name else "other"


def torch_training_state(
  state: Any, config: ml_collections.ConfigDict, params: dict[str, np.ndarray]
) -> tuple[dict, dict]:
  """(optimizer_state_dict, scheduler_state_dict) of the reference's AdamW + LambdaLR holding `state`'s Adam
  moments, per-parameter step counts and learning rates (`params`: the exported state dict, in torch's order)."""
  import torch  # noqa: PLC0415 - torch is optional: only the export path needs it

  from b2t_jax import optim  # noqa: PLC0415

  o = config.optim
  adam = _first(state.opt_state, optax.ScaleByAdamState)
  day = _first(state.opt_state, optim.DayAdamState)
  mu = params_to_state_dict(_merged(adam.mu, day.mu), config)
  nu = params_to_state_dict(_merged(adam.nu, day.nu), config)
  # Steps taken by each key: a day layer's own count (a day absent from a batch skips), else the main group's.
  main_steps = int(jax.device_get(adam.count))
  day_steps = _day_steps(day.count, config.model.kind)
  steps = {k: day_steps.get(k, main_steps) for k in params}
  tensors = {k: torch.from_numpy(np.array(v)) for k, v in params.items()}
  groups = {g: [tensors[k] for k in params if reference_group(k) == g] for g in ("bias", "day_layer", "other")}
  opt = torch.optim.AdamW(
    [
      {"params": groups["bias"], "weight_decay": 0.0, "group_type": "bias"},
      {"params": groups["day_layer"], "lr": o.day_lr_peak, "weight_decay": 0.0, "group_type": "day_layer"},
      {"params": groups["other"], "group_type": "other"},
    ],
    lr=o.lr_peak,
    betas=(o.b1, o.b2),
    eps=o.eps,
    weight_decay=o.weight_decay,
    fused=True,
  )
  for key, t in tensors.items():
    if steps[key] > 0:  # torch keeps no state for a parameter that never had a gradient
      opt.state[t] = {
        "step": torch.tensor(float(steps[key]), dtype=torch.float32),
        "exp_avg": torch.from_numpy(np.array(mu[key])),
        "exp_avg_sq": torch.from_numpy(np.array(nu[key])),
      }
  schedules = [optim.learning_rate(o), optim.day_learning_rate(o), optim.learning_rate(o)]
  peaks = [o.lr_peak, o.day_lr_peak, o.lr_peak]
  lambdas = [lambda s, f=f, p=p: float(f(s)) / p for f, p in zip(schedules, peaks)]
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
  step = int(jax.device_get(state.step))
  # The scheduler as after `step` calls of sched.step() (one per optimizer step in the reference's loop).
  sched.last_epoch, sched._step_count = step, step + 1
  sched._last_lr = [float(f(step)) for f in schedules]
  for group, lr in zip(opt.param_groups, sched._last_lr):
    group["lr"] = lr
  return opt.state_dict(), sched.state_dict()


def export_workdir(workdir: str, out: str, *, key_prefix: str = "") -> dict[str, Any]:
  """Writes `workdir`'s best (else latest) checkpoint as OUT/checkpoint/best_checkpoint + OUT/checkpoint/args.yaml
  (module doc). Returns a summary dict for printing."""
  import torch  # noqa: PLC0415
  import yaml  # noqa: PLC0415

  from b2t_jax import checkpoint as ckpt_lib  # noqa: PLC0415 - orbax is heavy; only the tool needs it
  from b2t_jax import sharding  # noqa: PLC0415
  from b2t_jax import workdir as workdir_lib  # noqa: PLC0415
  from b2t_jax.experiment import Experiment  # noqa: PLC0415

  workdir = workdir if "://" in workdir else os.path.abspath(workdir)  # orbax takes absolute paths
  config = workdir_lib.recorded_config(workdir)
  problems = refusals(config)
  if problems:
    raise CheckpointExportError(f"{workdir} cannot be written as a reference checkpoint:\n  " + "\n  ".join(problems))
  folder = os.path.join(out, CHECKPOINT_DIR)
  path = os.path.join(folder, CHECKPOINT_FILE)
  if os.path.exists(path):
    raise CheckpointExportError(f"{path} already exists; pass a new --out directory")
  # Checkpoints hold global arrays: restore them whole onto one device, whatever mesh trained them (the arrays go
  # to the host next; the triple model's params and moments are ~8 GB).
  exp = Experiment(config, mesh=sharding.create_mesh((1, 1), jax.local_devices()[:1]))
  ckpts = ckpt_lib.Checkpoints(workdir, read_only=True)
  try:
    state, meta = ckpts.restore(exp.abstract_state(), "best"), ckpts.best_meta()
    if state is None:
      state, meta = ckpts.restore(exp.abstract_state(), "latest"), None
  finally:
    ckpts.close()
  if state is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/best or {workdir}/checkpoints: nothing to export")
  params = params_to_state_dict(state.params, config)
  optimizer, scheduler = torch_training_state(state, config, params)
  val_per, val_loss = (math.nan, math.nan) if meta is None else (float(meta["val_per"]), float(meta["val_loss"]))
  os.makedirs(folder, exist_ok=True)
  torch.save(
    {
      "model_state_dict": {key_prefix + k: torch.from_numpy(v) for k, v in params.items()},
      "optimizer_state_dict": optimizer,
      "scheduler_state_dict": scheduler,
      "val_PER": val_per,
      "val_loss": val_loss,
    },
    path,
  )
  args_path = os.path.join(folder, ARGS_FILE)
  with open(args_path, "w") as f:
    yaml.safe_dump(reference_args.to_args(config, os.path.abspath(out)), f, sort_keys=False)
  return {
    "checkpoint": path,
    "args": args_path,
    "kind": config.model.kind,
    "step": int(jax.device_get(state.step)),
    "params": sum(int(v.size) for v in params.values()),
    "val_PER": val_per,
    "val_loss": val_loss,
  }
