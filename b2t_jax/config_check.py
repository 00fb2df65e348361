"""Up-front config validation: every mistake found before anything compiles or touches the workdir.

`validate(config)` checks enums, positive sizes, divisibility (batch over accumulation steps, processes and the
'data' mesh axis; the mesh over the devices) and that numbers are finite, and raises one `ConfigError` that names
every bad field with its value and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from b2t_jax.data.t15 import SPLITS
from b2t_jax.diphones import HEADS, TARGETS
from b2t_jax.models import mamba2, transformer
from b2t_jax.models.encoders import ENCODERS

ENUMS = {
  "mode": ("train", "eval", "infer", "calibrate", "summary"),
  "cpu_collectives": ("gloo", "mpi"),
  "data.on_bad_trial": ("error", "skip"),
  "data.loader": ("threads", "grain"),
  "data.synthetic.length_profile": ("demo", "t15"),
  "model.kind": ("gru", "triple"),
  "model.encoder": ENCODERS,
  "model.targets": TARGETS,
  "model.diphone_head": HEADS,
  "model.dtype": ("float32", "bfloat16", "float16"),
  "model.gru_backward": ("custom", "autodiff"),
  "infer.split": SPLITS,
  "infer.checkpoint": ("best", "latest"),
  "calibrate.init": ("identity", "last", "mean"),
  "decode.rescore.kind": ("none", "ngram", "causal_lm", "callable"),
}
POSITIVE = (
  "data.n_features",
  "data.feature_pool",
  "data.batch_size",
  "data.days_per_batch",
  "data.eval_batch_size",
  "data.max_label_len",
  "data.synthetic.n_sessions",
  "data.synthetic.trials_per_session",
  "model.n_classes",
  "model.patch_size",
  "model.patch_stride",
  "model.hidden",
  "model.n_layers",
  "model.noise_layers",
  "model.clean_layers",
  "model.noisy_layers",
  "model.gru_unroll",
  "optim.decay_steps",
  "optim.grad_accum_steps",
  "stream.chunk_bins",
  "aug.time_mask_max_bins",
  "train.num_steps",
  "train.n_models",
  "train.eval_every",
  "train.log_every",
  "train.checkpoint_every",
  "train.max_checkpoints",
  "train.max_nonfinite_steps",
  "train.lock_heartbeat_s",
  "train.lock_stale_s",
  "calibrate.n_sentences",
  "calibrate.batch_size",
  "calibrate.max_steps",
  "calibrate.eval_every",
  "calibrate.patience",
  "calibrate.steps_without_holdout",
  "decode.nbest",
  "decode.rescore.batch_size",
)
NON_NEGATIVE = (
  "data.prefetch",
  "data.prefetch_workers",
  "data.grain_workers",
  "train.profile_steps",
  "aug.static_gain_std",
  "aug.white_noise_std",
  "aug.constant_offset_std",
  "aug.random_walk_std",
  "aug.random_cut",
  "aug.smooth_kernel_std",
  "aug.smooth_kernel_size",
  "aug.smooth_threshold",
  "aug.time_jitter_shift_bins",
  "loss.intermediate_ctc_weight",
  "loss.phoneme_ctc_weight",
  "loss.marginal_ctc_weight",
  "loss.noisy_weight",
  "loss.noise_l2_weight",
  "loss.adversarial_warmup_steps",
  "optim.lr_peak",
  "optim.lr_min",
  "optim.day_lr_peak",
  "optim.day_lr_min",
  "optim.warmup_steps",
  "optim.day_warmup_steps",
  "optim.eps",
  "optim.weight_decay",
  "optim.grad_clip_norm",
  "decode.beam_size",
  "decode.beam_size_token",
  "decode.beam_threshold",
  "decode.rescore.gate_margin",
  "calibrate.lr",
  "calibrate.lr_rest",
)
# [0, 1)
UNIT_INTERVAL = (
  "model.input_dropout",
  "model.rnn_dropout",
  "optim.b1",
  "optim.b2",
  "calibrate.holdout_fraction",
  "aug.time_jitter_stretch",
  "aug.time_mask_fraction",
)
# The check of each encoder's sub-config (config.model.<encoder>), run for the encoder in use only.
ENCODER_CHECKS = {"transformer": transformer.check_config, "mamba2": mamba2.validate_config}
MAY_BE_INFINITE = ("decode.unk_score",)  # -inf = never emit an out-of-lexicon word


class ConfigError(ValueError):
  """A config that cannot run; the message lists every bad field."""


def _get(config: ml_collections.ConfigDict, path: str) -> Any:
  node = config
  for part in path.split("."):
    node = node[part]
  return node


def _has(config: ml_collections.ConfigDict, path: str) -> bool:
  node = config
  for part in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def _numbers(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """(dotted path, value) of every number in the config, tuples included."""
  items = tree.items() if isinstance(tree, (dict, ml_collections.ConfigDict)) else enumerate(tree)
  for k, v in items:
    path = f"{prefix}.{k}" if prefix and isinstance(k, str) else (f"{prefix}[{k}]" if prefix else str(k))
    if isinstance(v, (dict, ml_collections.ConfigDict, list, tuple)):
      yield from _numbers(v, path)
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
      yield path, v


def resolved_mesh(mesh_shape, n_devices: int) -> tuple[int, ...] | None:
  """`config.mesh_shape` with its -1 resolved against `n_devices`; None when it cannot be."""
  shape = list(mesh_shape)
  if len(shape) != 2 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    return None
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if n_devices % known:
      return None
    shape[shape.index(-1)] = n_devices // known
  return tuple(shape) if int(np.prod(shape)) == n_devices else None


def problems(
  config: ml_collections.ConfigDict, n_devices: int | None = None, n_processes: int | None = None
) -> list[str]:
  """Every reason `config` cannot run on `n_devices` devices in `n_processes` processes (default: this job)."""
  n_devices = jax.device_count() if n_devices is None else n_devices
  n_processes = jax.process_count() if n_processes is None else n_processes
  out = [
    f"config.{path}={_get(config, path)!r}: expected one of {', '.join(allowed)}"
    for path, allowed in ENUMS.items()
    if _has(config, path) and _get(config, path) not in allowed
  ]
  sizes = [
    f"config.{path}={value}: must be a finite number"
    for path, value in _numbers(config)
    if isinstance(value, float) and not math.isfinite(value) and path not in MAY_BE_INFINITE
  ]
  for paths, ok, rule in (
    (POSITIVE, lambda v: v > 0, "must be > 0"),
    (NON_NEGATIVE, lambda v: v >= 0, "must be >= 0"),
    (UNIT_INTERVAL, lambda v: 0 <= v < 1, "must be in [0, 1)"),
  ):
    for path in paths:
      value = _get(config, path) if _has(config, path) else None
      if value is not None and math.isfinite(value) and not ok(value):
        sizes.append(f"config.{path}={value}: {rule}")
  if not 0 < config.train.preempt_exit_code < 256:
    sizes.append(f"config.train.preempt_exit_code={config.train.preempt_exit_code}: must be in 1..255")
  out += sizes
  if sizes:  # the divisibility checks below assume sane sizes
    return out

  d, m, o = config.data, config.model, config.optim
  if d.n_features % d.feature_pool:
    out.append(f"config.data.feature_pool={d.feature_pool} must divide config.data.n_features={d.n_features}")
  if d.batch_size % d.days_per_batch:
    out.append(
      f"config.data.batch_size={d.batch_size} must be a multiple of config.data.days_per_batch={d.days_per_batch}"
    )
  if config.mode == "train" and d.days_per_batch > len(d.sessions):  # eval/infer never sample train batches
    out.append(
      f"config.data.days_per_batch={d.days_per_batch} exceeds the {len(d.sessions)} sessions of config.data.sessions"
    )
  if o.grad_accum_steps and d.batch_size % o.grad_accum_steps:
    out.append(f"config.optim.grad_accum_steps={o.grad_accum_steps} must divide config.data.batch_size={d.batch_size}")
  for name in ("warmup_steps", "day_warmup_steps"):
    if o[name] >= o.decay_steps:
      out.append(f"config.optim.{name}={o[name]} must be below config.optim.decay_steps={o.decay_steps}")
  if config.stream.chunk_bins % m.patch_stride:
    out.append(
      f"config.stream.chunk_bins={config.stream.chunk_bins} must be a multiple of "
      f"config.model.patch_stride={m.patch_stride}"
    )
  out += _calibrate_problems(config)
  out += _encoder_problems(config)
  if not 0.0 < d.length_window <= 1.0:
    out.append(f"config.data.length_window={d.length_window}: give a fraction of each day's trials in (0, 1]")
  buckets = tuple(d.time_buckets)
  if not buckets or any(b <= 0 for b in buckets) or list(buckets) != sorted(set(buckets)):
    out.append(f"config.data.time_buckets={buckets}: give increasing positive lengths in bins")
  mesh = resolved_mesh(config.mesh_shape, n_devices)
  if mesh is None:
    out.append(
      f"config.mesh_shape={tuple(config.mesh_shape)}: give (data, model) sizes whose product is the "
      f"{n_devices} devices (at most one -1, which takes the rest)"
    )
  else:
    n_data = mesh[0]
    micro = d.batch_size // o.grad_accum_steps if d.batch_size % o.grad_accum_steps == 0 else None
    if micro is not None and micro % n_data:
      out.append(
        f"config.data.batch_size={d.batch_size} / config.optim.grad_accum_steps={o.grad_accum_steps} = "
        f"{micro} trials per micro-batch must be a multiple of the {n_data} devices of the 'data' axis"
      )
    if d.eval_batch_size % n_data:
      out.append(
        f"config.data.eval_batch_size={d.eval_batch_size} must be a multiple of the {n_data} devices of the 'data' axis"
      )
  if config.mode == "calibrate" and mesh is not None and config.calibrate.batch_size % mesh[0]:
    out.append(
      f"config.calibrate.batch_size={config.calibrate.batch_size} must be a multiple of the {mesh[0]} devices of "
      "the 'data' axis"
    )
  if config.mode == "calibrate" and config.calibrate.batch_size % n_processes:
    out.append(
      f"config.calibrate.batch_size={config.calibrate.batch_size} must be a multiple of the {n_processes} processes"
    )
  if config.infer.member < -1:
    out.append(f"config.infer.member={config.infer.member}: -1 (all members, merged) or a member index")
  if config.infer.member >= 0 and config.infer.ensemble_workdirs:
    out.append("config.infer.member and config.infer.ensemble_workdirs exclude each other: decode one member, or merge")
  out += _decode_problems(config.decode)
  for field in ("batch_size", "eval_batch_size"):
    if d[field] % n_processes:
      out.append(f"config.data.{field}={d[field]} must be a multiple of the {n_processes} processes")
  return out


def _encoder_problems(config: ml_collections.ConfigDict) -> list[str]:
  """The encoder's own sub-config, and intermediate CTC layers that exist in the speech stack."""
  m, out = config.model, []
  if m.encoder in ENCODER_CHECKS:
    try:
      ENCODER_CHECKS[m.encoder](m[m.encoder])
    except ValueError as e:
      out.append(str(e))
  depth_field = "n_layers" if m.kind == "gru" else "clean_layers"
  layers = list(m.intermediate_ctc)
  last = m[depth_field] - 1
  if any(not isinstance(i, int) or not 0 <= i < last for i in layers) or len(set(layers)) != len(layers):
    out.append(
      f"config.model.intermediate_ctc={tuple(layers)}: give distinct layer indices of the speech stack before its "
      f"last layer (0..{last - 1}: config.model.{depth_field}={m[depth_field]})"
    )
  if layers and m.encoder == "gru" and m.gru_wavefront:
    out.append(
      "config.model.intermediate_ctc needs the layer-by-layer GRU: config.model.gru_wavefront=True runs every layer "
      "in one scan"
    )
  return out


def _decode_problems(dc: ml_collections.ConfigDict) -> list[str]:
  out, rs = [], dc.rescore
  if dc.nbest > dc.beam_size:
    out.append(
      f"config.decode.nbest={dc.nbest} exceeds config.decode.beam_size={dc.beam_size}: the list comes from the beam"
    )
  if rs.kind != "none":
    if not rs.path:
      what = {"ngram": "an LM file", "causal_lm": "a model directory", "callable": "'module:function'"}[rs.kind]
      out.append(f"config.decode.rescore.kind={rs.kind!r} needs config.decode.rescore.path ({what})")
    if rs.kind == "callable" and rs.path and ":" not in rs.path:
      out.append(f"config.decode.rescore.path={rs.path!r}: a callable rescorer is given as 'module:function'")
    if dc.nbest < 2:
      out.append(
        f"config.decode.rescore.kind={rs.kind!r} rescores the n-best list: set config.decode.nbest >= 2 "
        f"(it is {dc.nbest})"
      )
  return out


def _calibrate_problems(config: ml_collections.ConfigDict) -> list[str]:
  if config.mode != "calibrate":
    return []
  cal, out = config.calibrate, []
  for field in ("data_dir", "out_dir"):
    if not cal[field]:
      out.append(f"config.calibrate.{field} is empty: mode=calibrate needs it (see configs/default.py)")
  try:
    curve = [int(n) for n in cal.curve.split(",") if n.strip()]
  except ValueError:
    curve = [0]
  if any(n <= 0 for n in curve):
    out.append(f"config.calibrate.curve={cal.curve!r}: give positive sentence counts separated by commas")
  if config.train.n_models > 1:
    out.append(
      f"config.train.n_models={config.train.n_models}: calibrate one model; an ensemble's members are not "
      "calibrated yet (decode a member alone with config.infer.member)"
    )
  return out


def validate(config: ml_collections.ConfigDict, n_devices: int | None = None, n_processes: int | None = None) -> None:
  """Raises a `ConfigError` listing every problem of `config` (see `problems`)."""
  found = problems(config, n_devices, n_processes)
  if found:
    raise ConfigError("invalid config (fix these flags or the config file):\n  " + "\n  ".join(found))
