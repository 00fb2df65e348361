"""The reference's rnn_args.yaml <-> a b2t_jax config: one table (`KEYS`), read three ways.

- `read_args` + `build`: a YAML -> config fields (configs/reference_yaml.py for training, the checkpoint importer).
- `mapping_table`: what `mode=summary` prints for a config built from a YAML.
- `to_args`: a config -> an args.yaml in the reference's layout (tools/export_torch_checkpoint.py).

Every key of the released file (NEJM 2024 `model_training/rnn_args.yaml`, about 60 leaves), of its TPU variant
(`use_tpu`, `num_tpu_cores`, `gradient_accumulation_steps`, `dataset.num_dataloader_workers`, the `adversarial`
block) and the keys the importer has always read (`model.kind`, `model.{noise,clean,noisy}_layers`) is in `KEYS`:
copied to a config field, turned into fields by a rule of its own, checked, or ignored with the reason. A key
that is not there is an error naming it and the file.

Batch, as Accelerate counts it: `dataset.batch_size` (per core) x `num_tpu_cores` x `gradient_accumulation_steps`
trials per optimizer step (`data.batch_size`), in `gradient_accumulation_steps` micro-batches
(`optim.grad_accum_steps`); validation batches hold `dataset.batch_size` x `num_tpu_cores` trials.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any

import ml_collections

from b2t_jax.data.t15 import T15_SESSIONS

MISSING = object()  # `Key.released` of a key the released file does not have


class ReferenceArgsError(ValueError):
  """An rnn_args.yaml that cannot become a b2t_jax config; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class Key:
  """One YAML key: its dotted path, its value in the released file, and what b2t_jax does with it.

  `field`: the config field it is copied to (type of the field's default). Otherwise `rule` says in words what
  `build` does with it (a rule of its own, a check, or why it is ignored); `ignored` marks the latter.
  """

  path: str
  released: Any
  field: str = ""
  rule: str = ""
  ignored: bool = False


def _copy(path: str, released: Any, field: str) -> Key:
  return Key(path, released, field=field)


def _rule(path: str, released: Any, rule: str) -> Key:
  return Key(path, released, rule=rule)


def _ignored(path: str, released: Any, why: str) -> Key:
  return Key(path, released, rule=why, ignored=True)


# Positions in the released file's session list whose `dataset_probability_val` is 0: the t15 sessions that have
# no val (or test) data (SPEC §1).
_NO_VAL_SESSIONS = tuple(T15_SESSIONS[i] for i in (0, 28, 32, 33))
_DT = "dataset.data_transforms."

# In the released file's order; the TPU variant's and the importer's keys at the end of their blocks.
KEYS: tuple[Key, ...] = (
  _rule("model.n_input_features", 512, "data.n_features (features per bin; the day layers are F x F)"),
  _copy("model.n_units", 768, "model.hidden"),
  _copy("model.rnn_dropout", 0.4, "model.rnn_dropout"),
  _rule("model.rnn_trainable", True, "checked: must be true (b2t_jax cannot freeze the GRU)"),
  _copy("model.n_layers", 5, "model.n_layers"),
  _copy("model.patch_size", 14, "model.patch_size"),
  _copy("model.patch_stride", 4, "model.patch_stride"),
  _rule("model.input_network.n_input_layers", 1, "checked: must be 1 (one day layer per session)"),
  _rule("model.input_network.input_layer_sizes", [512], "checked: must be [model.n_input_features] (F x F day layers)"),
  _rule("model.input_network.input_trainable", True, "checked: must be true (b2t_jax cannot freeze the day layers)"),
  _copy("model.input_network.input_layer_dropout", 0.2, "model.input_dropout"),
  _rule("model.kind", MISSING, "model.kind: gru | triple (b2t_jax's own key; agrees with adversarial.enabled)"),
  _copy("model.noise_layers", MISSING, "model.noise_layers"),
  _copy("model.clean_layers", MISSING, "model.clean_layers"),
  _copy("model.noisy_layers", MISSING, "model.noisy_layers"),
  _ignored("gpu_number", "1", "JAX places work by the device mesh (config.mesh_shape), not by a GPU index"),
  _ignored("mode", "train", "the reference creates output_dir only in 'train'; b2t_jax's mode is --config.mode"),
  _rule("use_amp", True, "model.dtype: bfloat16 when true (bf16 matmuls; params, GRU carry and CTC stay fp32)"),
  _ignored(
    "output_dir", "trained_models/baseline_rnn", "the workdir of tools/train_model.py (b2t_jax.main: --workdir)"
  ),
  _ignored(
    "checkpoint_dir",
    "trained_models/baseline_rnn/checkpoint",
    "b2t_jax keeps WORKDIR/checkpoints and WORKDIR/best (orbax); tools/export_torch_checkpoint.py writes this layout",
  ),
  _rule(
    "init_from_checkpoint",
    False,
    "checked: must be false (import with tools/import_torch_checkpoint.py, then train in its workdir)",
  ),
  _ignored("init_checkpoint_path", "None", "read only with init_from_checkpoint: true"),
  _ignored("save_best_checkpoint", True, "b2t_jax always keeps the best checkpoint (WORKDIR/best)"),
  _ignored("save_all_val_steps", False, "b2t_jax keeps train.max_checkpoints latest checkpoints and the best one"),
  _ignored("save_final_model", False, "the last step is always saved (WORKDIR/checkpoints)"),
  _ignored("save_val_metrics", True, "validation metrics go to TensorBoard and the log (mode=eval: metrics.json)"),
  _rule("early_stopping", False, "checked: must be false (b2t_jax trains num_training_batches steps, keeps the best)"),
  _ignored("early_stopping_val_steps", 20, "read only with early_stopping: true"),
  _copy("num_training_batches", 120_000, "train.num_steps"),
  _rule("lr_scheduler_type", "cosine", "checked: must be cosine (warm-up + cosine, optim.*)"),
  _copy("lr_max", 0.005, "optim.lr_peak"),
  _copy("lr_min", 0.0001, "optim.lr_min"),
  _copy("lr_decay_steps", 120_000, "optim.decay_steps"),
  _copy("lr_warmup_steps", 1000, "optim.warmup_steps"),
  _copy("lr_max_day", 0.005, "optim.day_lr_peak"),
  _copy("lr_min_day", 0.0001, "optim.day_lr_min"),
  _rule("lr_decay_steps_day", 120_000, "checked: must equal lr_decay_steps (one optim.decay_steps for both)"),
  _copy("lr_warmup_steps_day", 1000, "optim.day_warmup_steps"),
  _copy("beta0", 0.9, "optim.b1"),
  _copy("beta1", 0.999, "optim.b2"),
  _copy("epsilon", 0.1, "optim.eps"),
  _copy("weight_decay", 0.001, "optim.weight_decay"),
  _rule("weight_decay_day", 0, "checked: must be 0 (b2t_jax never decays the day layers)"),
  _copy("seed", 10, "seed"),
  _copy("grad_norm_clip_value", 10, "optim.grad_clip_norm"),
  _copy("batches_per_train_log", 200, "train.log_every"),
  _copy("batches_per_val_step", 2000, "train.eval_every"),
  _ignored("batches_per_save", 0, "unused by the reference trainer; b2t_jax saves every train.checkpoint_every steps"),
  _ignored("log_individual_day_val_PER", True, "b2t_jax always logs the per-day PER table"),
  _ignored("log_val_skip_logs", False, "logging only"),
  _ignored("save_val_logits", True, "mode=infer --config.infer.save_logits=True writes logits"),
  _ignored("save_val_data", False, "the inputs are the dataset's; nothing to save"),
  _ignored("use_tpu", MISSING, "JAX runs on the accelerator it finds (tools/launch_tpu_training.py checks the cores)"),
  _rule("num_tpu_cores", MISSING, "x dataset.batch_size x gradient_accumulation_steps = data.batch_size"),
  _rule("gradient_accumulation_steps", MISSING, "optim.grad_accum_steps (and a factor of data.batch_size)"),
  _copy(_DT + "white_noise_std", 1.0, "aug.white_noise_std"),
  _copy(_DT + "constant_offset_std", 0.2, "aug.constant_offset_std"),
  _copy(_DT + "random_walk_std", 0.0, "aug.random_walk_std"),
  _rule(_DT + "random_walk_axis", -1, "checked when random_walk_std > 0: must be 1 or -2 (b2t_jax walks over time)"),
  _copy(_DT + "static_gain_std", 0.0, "aug.static_gain_std"),
  _copy(_DT + "random_cut", 3, "aug.random_cut"),
  _copy(_DT + "smooth_kernel_size", 100, "aug.smooth_kernel_size"),
  _rule(_DT + "smooth_data", True, "aug.smooth_kernel_std = 0 (no smoothing) when false"),
  _copy(_DT + "smooth_kernel_std", 2, "aug.smooth_kernel_std"),
  _ignored("dataset.neural_dim", 512, "unused by the reference code (its model reads model.n_input_features)"),
  _rule(
    "dataset.batch_size",
    64,
    "per core: x num_tpu_cores x gradient_accumulation_steps = data.batch_size; x num_tpu_cores = data.eval_batch_size",
  ),
  _copy("dataset.n_classes", 41, "model.n_classes"),
  _ignored("dataset.max_seq_elements", 500, "unused by the reference code; labels pad to data.max_label_len"),
  _copy("dataset.days_per_batch", 4, "data.days_per_batch"),
  _copy("dataset.seed", 1, "data.seed"),
  _ignored("dataset.num_dataloader_workers", 4, "the input pipeline sizes itself (data.prefetch_workers)"),
  _ignored("dataset.loader_shuffle", False, "batch k is a pure function of (data.seed, k)"),
  _ignored("dataset.must_include_days", None, "unused by the reference trainer (it passes None)"),
  _ignored(
    "dataset.test_percentage", 0.1, "unused by the reference trainer: train on data_train, validate on data_val"
  ),
  _rule("dataset.feature_subset", None, "checked: must be null (b2t_jax reads every feature column)"),
  _rule("dataset.dataset_dir", "../data/hdf5_data_final", "data.data_dir (relative: from the current directory)"),
  _ignored("dataset.bad_trials_dict", None, "unused by the reference trainer (it passes None)"),
  _rule("dataset.sessions", list(T15_SESSIONS), "data.sessions (a session's position is its day index)"),
  _ignored(
    "dataset.dataset_probability_val",
    [0 if s in _NO_VAL_SESSIONS else 1 for s in T15_SESSIONS],
    "b2t_jax validates on every session that has a data_val.hdf5 (the released 0s are the sessions without one)",
  ),
  _rule("adversarial.enabled", MISSING, "true: model.kind = triple (noise, clean and adversarial noisy decoders)"),
  _copy("adversarial.grl_lambda", MISSING, "model.grl_lambda"),
  _copy("adversarial.noisy_loss_weight", MISSING, "loss.noisy_weight"),
  _copy("adversarial.noise_l2_weight", MISSING, "loss.noise_l2_weight"),
  _copy("adversarial.warmup_steps", MISSING, "loss.adversarial_warmup_steps"),
)
BY_PATH = {k.path: k for k in KEYS}
# Blocks (YAML mappings) of the known layout; everything else is a leaf.
BLOCKS = frozenset(".".join(k.path.split(".")[:i]) for k in KEYS for i in range(1, k.path.count(".") + 1))
# Keys the model's shapes depend on: required, as in the reference code (a wrong default would fail at restore).
REQUIRED = (
  "model.n_input_features",
  "model.n_units",
  "model.patch_size",
  "model.patch_stride",
  "dataset.sessions",
  "dataset.n_classes",
)
KINDS = ("gru", "triple")
# What the reference has no knob for, set on every config built from a YAML.
IMPLIED = {"data.feature_pool": 1, "model.patch_features": 0}


@dataclasses.dataclass
class Row:
  """One YAML key of a file and what it became: `fields` it set (-> `text`), or a check / an ignore (`text`)."""

  key: str
  value: Any
  fields: tuple[str, ...]
  text: str


@dataclasses.dataclass
class Mapping:
  """The result of `build`: config fields to set (in order), one row per key of the file, and the problems that
  were allowed through (`strict=False`)."""

  overrides: dict[str, Any]
  rows: list[Row]
  warnings: list[str]
  kind: str


def read_args(path: str) -> dict[str, Any]:
  """An rnn_args.yaml as a dict (plain YAML, as OmegaConf writes it)."""
  import yaml  # noqa: PLC0415 - only the YAML paths need it

  if not os.path.isfile(path):
    raise ReferenceArgsError(f"{path}: no such file (give the path of a reference rnn_args.yaml / args.yaml)")
  with open(path) as f:
    try:
      args = yaml.safe_load(f)
    except yaml.YAMLError as e:
      raise ReferenceArgsError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
  if not isinstance(args, dict):
    raise ReferenceArgsError(f"{path}: expected a YAML mapping of the reference's keys, got {type(args).__name__}")
  return args


def leaves(args: dict[str, Any], source: str) -> dict[str, Any]:
  """{dotted key: value} of every leaf of `args`; a key outside `KEYS` (or a block where a value belongs, or the
  other way round) is a `ReferenceArgsError` naming it and `source`."""
  out: dict[str, Any] = {}

  def walk(node: dict, prefix: str) -> None:
    for k, v in node.items():
      path = f"{prefix}{k}"
      if path in BLOCKS:
        if not isinstance(v, dict):
          raise ReferenceArgsError(f"{source}: '{path}' must be a mapping of keys, got {v!r}")
        walk(v, path + ".")
      elif path in BY_PATH:
        if isinstance(v, dict):
          raise ReferenceArgsError(f"{source}: '{path}' must be a value, got a mapping {v!r}")
        out[path] = v
      else:
        siblings = [p.rpartition(".")[2] for p in (*BY_PATH, *BLOCKS) if p.rpartition(".")[0] == prefix.rstrip(".")]
        near = difflib.get_close_matches(str(k), siblings, n=1)
        hint = f" (did you mean '{prefix}{near[0]}'?)" if near else ""
        raise ReferenceArgsError(
          f"{source}: unknown key '{path}'{hint}: it is not a key of the reference's rnn_args.yaml, of its TPU "
          "variant or of b2t_jax's importer (b2t_jax/reference_args.py lists them); remove it or fix its spelling"
        )

  walk(args, "")
  return out


def _coerce(value: Any, like: Any, key: str, source: str) -> Any:
  """A YAML value cast to the type of the config field's default (YAML writes 2 for 2.0)."""
  bad = ReferenceArgsError(f"{source}: {key} = {value!r} is not a {type(like).__name__}")
  if isinstance(like, bool):
    if not isinstance(value, bool):
      raise bad
    return value
  if isinstance(like, int):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
      raise bad
    return int(value)
  if isinstance(like, float):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise bad
    return float(value)
  return value


def _field(config: ml_collections.ConfigDict, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _local_abspath(path: str) -> str:
  """Relative local paths resolve from the current directory (as the reference's do); URLs stay as given."""
  return path if not path or "://" in path else os.path.abspath(path)


def _kind(values: dict[str, Any], source: str, default: str) -> str:
  """gru | triple from `model.kind` and `adversarial.enabled` (they must agree), else `default`."""
  kind = values.get("model.kind")
  if kind is not None and kind not in KINDS:
    raise ReferenceArgsError(f"{source}: model.kind = {kind!r}: expected one of {', '.join(KINDS)}")
  enabled = values.get("adversarial.enabled")
  if enabled is not None and not isinstance(enabled, bool):
    raise ReferenceArgsError(f"{source}: adversarial.enabled = {enabled!r}: expected true or false")
  if enabled is not None and kind is not None and (kind == "triple") != enabled:
    raise ReferenceArgsError(
      f"{source}: adversarial.enabled = {str(enabled).lower()} contradicts model.kind = {kind}: the adversarial "
      "(triple) decoder is model.kind triple; remove one of the two keys"
    )
  if kind is not None:
    return kind
  return "triple" if enabled else ("gru" if enabled is not None else default)


def build(
  args: dict[str, Any],
  source: str,
  base: ml_collections.ConfigDict,
  *,
  strict: bool = True,
  default_kind: str = "gru",
  paths: bool = True,
) -> Mapping:
  """The config fields an rnn_args.yaml (`args`, read from `source`) sets on `base` (configs/default.py, which
  gives each field's type).

  `strict` (training from the file): a setting b2t_jax does not reproduce is an error; otherwise (importing a
  trained model, whose weights do not depend on it) it becomes a warning. Settings the model's inputs or shapes
  depend on are errors either way. `default_kind` is the model kind when the file names none; `paths=False` leaves
  `data.data_dir` alone (an imported run's data path belongs to another machine).
  """
  values = leaves(args, source)
  kind = _kind(values, source, default_kind)
  missing = [k for k in REQUIRED + (("model.n_layers",) if kind == "gru" else ()) if k not in values]
  if missing:
    raise ReferenceArgsError(f"{source}: missing {', '.join(missing)} (the model's shapes depend on them)")
  sessions = values["dataset.sessions"]
  if not isinstance(sessions, list) or not sessions or not all(isinstance(s, str) for s in sessions):
    raise ReferenceArgsError(f"{source}: dataset.sessions must be a non-empty list of session names, got {sessions!r}")
  rows: dict[str, Row] = {}
  out: dict[str, Any] = {"model.kind": kind}
  problems: list[str] = []

  def get(key: str, like: Any) -> Any:
    return _coerce(values[key], like, key, source)

  def note(key: str, text: str, fields: tuple[str, ...] = ()) -> None:
    rows[key] = Row(key, values[key], fields, text)

  def sets(key: str, fields: dict[str, Any], text: str = "") -> None:
    out.update(fields)
    note(key, text or ", ".join(f"{f} = {v!r}" for f, v in fields.items()), tuple(fields))

  def check(key: str, ok: bool, why: str, *, always: bool = False) -> None:
    note(key, BY_PATH[key].rule)
    if not ok:
      msg = f"{source}: {key} = {values[key]!r}: {why}"
      if always:
        raise ReferenceArgsError(msg)
      problems.append(msg)

  for key in values:
    spec = BY_PATH[key]
    if spec.field:
      sets(key, {spec.field: get(key, _field(base, spec.field))})
    elif spec.ignored:
      note(key, "ignored: " + spec.rule)
  n_features = get("model.n_input_features", base.data.n_features)
  sets("model.n_input_features", {"data.n_features": n_features})
  sets("dataset.sessions", {"data.sessions": tuple(sessions)}, f"data.sessions = ({len(sessions)} sessions)")
  cores = get("num_tpu_cores", 1) if "num_tpu_cores" in values else 1
  accum = get("gradient_accumulation_steps", 1) if "gradient_accumulation_steps" in values else 1
  if "dataset.batch_size" in values:
    per_core = get("dataset.batch_size", base.data.batch_size)
    sets(
      "dataset.batch_size",
      {"data.batch_size": per_core * cores * accum, "data.eval_batch_size": per_core * cores},
      f"data.batch_size = {per_core * cores * accum} ({per_core} per core x {cores} cores x {accum} accumulation), "
      f"data.eval_batch_size = {per_core * cores}",
    )
  if "num_tpu_cores" in values:
    note("num_tpu_cores", f"a factor of data.batch_size ({cores} cores)", ("data.batch_size",))
  if "gradient_accumulation_steps" in values:
    sets("gradient_accumulation_steps", {"optim.grad_accum_steps": accum})
  if "use_amp" in values:
    sets("use_amp", {"model.dtype": "bfloat16" if get("use_amp", True) else "float32"})
  for key in ("model.kind", "adversarial.enabled"):
    if key in values:
      sets(key, {"model.kind": kind})
  if kind == "triple" and "model.n_layers" in values:
    out.pop("model.n_layers")
    note("model.n_layers", "ignored: the triple model's depths are model.noise_layers, clean_layers, noisy_layers")
  if _DT + "smooth_data" in values:
    if get(_DT + "smooth_data", True):
      note(_DT + "smooth_data", "smoothing on (aug.smooth_kernel_std, aug.smooth_kernel_size)")
    else:
      sets(_DT + "smooth_data", {"aug.smooth_kernel_std": 0.0})
  if "dataset.dataset_dir" in values:
    if paths:
      sets("dataset.dataset_dir", {"data.data_dir": _local_abspath(str(values["dataset.dataset_dir"]))})
    else:
      note("dataset.dataset_dir", "ignored: the trained run's data path (give --config.data.data_dir)")

  # The model's inputs and shapes: errors always.
  if "model.input_network.n_input_layers" in values:
    ok = values["model.input_network.n_input_layers"] == 1
    check("model.input_network.n_input_layers", ok, "only one day layer per session is supported", always=True)
  if "model.input_network.input_layer_sizes" in values:
    ok = values["model.input_network.input_layer_sizes"] == [n_features]
    why = f"the day layers are {n_features} x {n_features} (model.n_input_features)"
    check("model.input_network.input_layer_sizes", ok, why, always=True)
  if "dataset.feature_subset" in values:
    why = "b2t_jax reads every feature column of the files, so this model's inputs cannot be reproduced"
    check("dataset.feature_subset", values["dataset.feature_subset"] is None, why, always=True)
  # Training settings b2t_jax does not reproduce: errors when training from the file, warnings on import.
  for key, want, why in (
    ("model.rnn_trainable", True, "b2t_jax trains every GRU parameter"),
    ("model.input_network.input_trainable", True, "b2t_jax trains the day layers"),
    ("init_from_checkpoint", False, "import it with tools/import_torch_checkpoint.py and train in that workdir"),
    ("early_stopping", False, "b2t_jax trains num_training_batches steps and keeps the best checkpoint"),
    ("lr_scheduler_type", "cosine", "b2t_jax's schedule is a linear warm-up, then cosine"),
    ("weight_decay_day", 0, "b2t_jax never decays the day layers"),
  ):
    if key in values:
      shown = str(want).lower() if isinstance(want, bool) else repr(want)
      check(key, values[key] == want, f"{why}; set it to {shown}")
  if "lr_decay_steps_day" in values:
    same = values["lr_decay_steps_day"] == values.get("lr_decay_steps", base.optim.decay_steps)
    check("lr_decay_steps_day", same, "b2t_jax decays both groups over one optim.decay_steps; make it lr_decay_steps")
  if _DT + "random_walk_axis" in values:
    walks = float(values.get(_DT + "random_walk_std") or 0) > 0
    time_axes = (1, -2)  # the reference's batches are (trial, time, channel)
    why = "b2t_jax's random walk runs over time (axis 1), the reference's -1 is the channel axis; set it to 1"
    check(_DT + "random_walk_axis", not walks or values[_DT + "random_walk_axis"] in time_axes, why)
  for key in ("seed", "dataset.seed"):
    if key in values and values[key] == -1:
      problems.append(f"{source}: {key} = -1 draws a random seed in the reference; b2t_jax is always seeded: give one")
  if problems and strict:
    raise ReferenceArgsError("\n".join(problems))
  out.update(IMPLIED)
  return Mapping(overrides=out, rows=[rows[k] for k in values if k in rows], warnings=problems, kind=kind)


def apply(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """Sets the 'section.field' / 'field' values of `overrides` on `config` (a new, unfrozen one) and returns it."""
  for key, value in overrides.items():
    *sections, field = key.split(".")
    node = config
    for s in sections:
      node = node[s]
    node[field] = value
  return config


def config_from_yaml(path: str, base: ml_collections.ConfigDict, cores: int | None = None) -> ml_collections.ConfigDict:
  """`base` (configs/default.py) with everything the rnn_args.yaml at `path` sets, strictly (training), and
  `reference_yaml` = its absolute path (mode=summary prints the mapping from it). `cores` replaces the file's
  `num_tpu_cores` (tools/launch_tpu_training.py --num_cores: the cores that actually run, as Accelerate counts)."""
  args = read_args(path)
  if cores is not None:
    args["num_tpu_cores"] = cores
  mapping = build(args, path, base)
  config = apply(base, mapping.overrides)
  config.reference_yaml = os.path.abspath(path)
  return config


def output_dir(path: str) -> str:
  """The YAML's `output_dir` (the reference trainer's run folder), absolute from the current directory."""
  args = read_args(path)
  leaves(args, path)
  if not args.get("output_dir"):
    raise ReferenceArgsError(f"{path}: output_dir is missing (tools/train_model.py trains into it)")
  return _local_abspath(str(args["output_dir"]))


_VALUE_WIDTH = 24  # characters of a YAML value shown in the table


def _short(value: Any, width: int) -> str:
  text = repr(value) if not isinstance(value, list) or len(value) <= 3 else f"[{len(value)} items]"
  return text if len(text) <= width else text[: width - 3] + "..."


def mapping_table(config: ml_collections.ConfigDict) -> str:
  """The table of the YAML `config.reference_yaml`: key | its value | the config field(s) it set, with the value
  now in `config` where a --config override changed it."""
  from configs import default  # noqa: PLC0415 - the installed configs package (field types)

  path = config.reference_yaml
  mapping = build(read_args(path), path, default.get_config())
  key_w = max(len(r.key) for r in mapping.rows)
  lines = [f"{path} -> b2t_jax config ({len(mapping.rows)} keys):"]
  for r in mapping.rows:
    text = r.text
    changed = [f for f in r.fields if f in mapping.overrides and _field(config, f) != mapping.overrides[f]]
    if changed:
      text += "  [now " + ", ".join(f"{f} = {_field(config, f)!r}" for f in changed) + " by --config override]"
    lines.append(f"  {r.key:<{key_w}}  {_short(r.value, _VALUE_WIDTH):<{_VALUE_WIDTH}}  {text}")
  lines.append("  also: " + ", ".join(f"{k} = {v!r}" for k, v in IMPLIED.items()) + " (the reference has neither)")
  return "\n".join(lines)


def _set(tree: dict, dotted: str, value: Any) -> None:
  *blocks, leaf = dotted.split(".")
  for b in blocks:
    tree = tree.setdefault(b, {})
  tree[leaf] = value


def to_args(config: ml_collections.ConfigDict, out_dir: str) -> dict[str, Any]:
  """An args.yaml (nested dict, the released file's layout and key order) describing `config`'s model and
  training, for a reference checkpoint folder `out_dir` (output_dir; checkpoint_dir = OUT/checkpoint). Keys
  without a config field keep the released file's values; a triple model adds `model.kind`, its depths and the
  `adversarial` block, and accumulation adds `gradient_accumulation_steps`. `build` reads it back to the same
  fields (tested)."""
  kind = config.model.kind
  accum = config.optim.grad_accum_steps
  sessions = list(config.data.sessions)
  special: dict[str, Any] = {
    "model.n_input_features": config.data.n_features,
    "model.input_network.input_layer_sizes": [config.data.n_features],
    "use_amp": config.model.dtype == "bfloat16",
    "output_dir": out_dir,
    "checkpoint_dir": os.path.join(out_dir, "checkpoint"),
    "lr_decay_steps_day": config.optim.decay_steps,
    _DT + "smooth_data": config.aug.smooth_kernel_std > 0,
    "dataset.batch_size": config.data.batch_size // accum,
    "dataset.dataset_dir": config.data.data_dir or BY_PATH["dataset.dataset_dir"].released,
    "dataset.sessions": sessions,
    "dataset.dataset_probability_val": [0 if s in _NO_VAL_SESSIONS else 1 for s in sessions],
  }
  if accum > 1:
    special["gradient_accumulation_steps"] = accum
  if kind == "triple":
    special["model.kind"] = "triple"
    special["adversarial.enabled"] = True
  args: dict[str, Any] = {}
  for key in KEYS:
    if key.path in special:
      value = special[key.path]
    elif key.field and (key.released is not MISSING or kind == "triple"):
      value = _field(config, key.field)
      if key.path == _DT + "smooth_kernel_std" and value == 0:
        value = key.released  # smoothing off is smooth_data: false
    elif key.released is not MISSING:
      value = key.released
    else:
      continue
    _set(args, key.path, value)
  return args
