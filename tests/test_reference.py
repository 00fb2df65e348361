"""The reference's interfaces: its rnn_args.yaml (released and TPU-variant keys) as a config, its training and
evaluation commands, and its checkpoints written back (exact params, torch logits, the optimizer's next step)."""

import copy
import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import yaml
from conftest import ROOT, cpu_env
from test_torch_import import TorchGRUDecoder, TorchTriple, _load_config

from b2t_jax import checkpoint as ckpt_lib
from b2t_jax import config_check, reference_args, sharding
from b2t_jax import workdir as workdir_lib
from b2t_jax.data import tfds_b2t
from b2t_jax.data.t15 import T15_SESSIONS
from b2t_jax.experiment import Experiment
from b2t_jax.summary import parameter_counts
from b2t_jax.torch_import import import_checkpoint, params_to_state_dict, state_dict_to_params
from b2t_jax.torch_import.export import CheckpointExportError, export_workdir, refusals
from configs import default
from configs import reference_yaml as reference_yaml_config

NO_VAL = {0, 28, 32, 33}  # the released file's dataset_probability_val zeros (sessions without val data)

# The released model_training/rnn_args.yaml (NEJM 2024, commit 980a5b7): its full key set and values, comments
# dropped; the two 45-entry lists are filled in below.
RELEASED = """
model:
  n_input_features: 512
  n_units: 768
  rnn_dropout: 0.4
  rnn_trainable: true
  n_layers: 5
  patch_size: 14
  patch_stride: 4
  input_network:
    n_input_layers: 1
    input_layer_sizes:
    - 512
    input_trainable: true
    input_layer_dropout: 0.2
gpu_number: '1'
mode: train
use_amp: true
output_dir: trained_models/baseline_rnn
checkpoint_dir: trained_models/baseline_rnn/checkpoint
init_from_checkpoint: false
init_checkpoint_path: None
save_best_checkpoint: true
save_all_val_steps: false
save_final_model: false
save_val_metrics: true
early_stopping: false
early_stopping_val_steps: 20
num_training_batches: 120000
lr_scheduler_type: cosine
lr_max: 0.005
lr_min: 0.0001
lr_decay_steps: 120000
lr_warmup_steps: 1000
lr_max_day: 0.005
lr_min_day: 0.0001
lr_decay_steps_day: 120000
lr_warmup_steps_day: 1000
beta0: 0.9
beta1: 0.999
epsilon: 0.1
weight_decay: 0.001
weight_decay_day: 0
seed: 10
grad_norm_clip_value: 10
batches_per_train_log: 200
batches_per_val_step: 2000
batches_per_save: 0
log_individual_day_val_PER: true
log_val_skip_logs: false
save_val_logits: true
save_val_data: false
dataset:
  data_transforms:
    white_noise_std: 1.0
    constant_offset_std: 0.2
    random_walk_std: 0.0
    random_walk_axis: -1
    static_gain_std: 0.0
    random_cut: 3
    smooth_kernel_size: 100
    smooth_data: true
    smooth_kernel_std: 2
  neural_dim: 512
  batch_size: 64
  n_classes: 41
  max_seq_elements: 500
  days_per_batch: 4
  seed: 1
  num_dataloader_workers: 4
  loader_shuffle: false
  must_include_days: null
  test_percentage: 0.1
  feature_subset: null
  dataset_dir: ../data/hdf5_data_final
  bad_trials_dict: null
"""
RELEASED_LEAVES = 72  # leaves of the released file (lists count as one)


def released_args() -> dict:
  args = yaml.safe_load(RELEASED)
  args["dataset"]["sessions"] = list(T15_SESSIONS)
  args["dataset"]["dataset_probability_val"] = [0 if i in NO_VAL else 1 for i in range(len(T15_SESSIONS))]
  return args


def tpu_args() -> dict:
  """The TPU variant: the released layout plus its keys, where the issue places them."""
  args = released_args()
  args.update(use_tpu=True, num_tpu_cores=8, gradient_accumulation_steps=2, use_amp=True)
  args["dataset"].update(batch_size=32, num_dataloader_workers=8)
  args["adversarial"] = {
    "enabled": True,
    "grl_lambda": 0.3,
    "noisy_loss_weight": 0.25,
    "noise_l2_weight": 0.01,
    "warmup_steps": 500,
  }
  return args


def _write(path, args) -> str:
  with open(path, "w") as f:
    yaml.safe_dump(args, f, sort_keys=False)
  return str(path)


def _count_leaves(node) -> int:
  return sum(_count_leaves(v) if isinstance(v, dict) else 1 for v in node.values())


def test_released_yaml_gives_the_baseline(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # relative paths resolve from the current directory
  path = _write(tmp_path / "rnn_args.yaml", released_args())
  c = reference_yaml_config.get_config("rnn_args.yaml")
  assert parameter_counts(c)["total"] == 44_315_177
  assert (c.model.kind, c.model.dtype, c.model.hidden, c.model.n_layers) == ("gru", "bfloat16", 768, 5)
  assert (c.model.patch_size, c.model.patch_stride, c.model.patch_features, c.data.feature_pool) == (14, 4, 0, 1)
  assert (c.model.input_dropout, c.model.rnn_dropout, c.model.n_classes) == (0.2, 0.4, 41)
  assert (c.data.batch_size, c.optim.grad_accum_steps, c.data.eval_batch_size, c.data.days_per_batch) == (64, 1, 64, 4)
  assert (c.data.sessions, c.data.n_features) == (T15_SESSIONS, 512)
  assert c.data.data_dir == str(tmp_path.parent / "data" / "hdf5_data_final")
  assert (c.seed, c.data.seed, c.train.num_steps, c.train.log_every, c.train.eval_every) == (10, 1, 120_000, 200, 2000)
  o = c.optim
  assert (o.lr_peak, o.lr_min, o.decay_steps, o.warmup_steps) == (0.005, 0.0001, 120_000, 1000)
  assert (o.day_lr_peak, o.day_lr_min, o.day_warmup_steps) == (0.005, 0.0001, 1000)
  assert (o.b1, o.b2, o.eps, o.weight_decay, o.grad_clip_norm) == (0.9, 0.999, 0.1, 0.001, 10.0)
  a = c.aug
  assert (a.white_noise_std, a.constant_offset_std, a.random_walk_std, a.static_gain_std) == (1.0, 0.2, 0.0, 0.0)
  assert (a.random_cut, a.smooth_kernel_size, a.smooth_kernel_std) == (3, 100, 2.0)
  assert c.reference_yaml == path
  # Every key of the file has its row: copied, ruled, checked or ignored with a reason.
  mapping = reference_args.build(released_args(), path, default.get_config())
  assert len(mapping.rows) == _count_leaves(released_args()) == RELEASED_LEAVES
  assert all(r.text for r in mapping.rows) and not mapping.warnings


def test_tpu_variant_yaml_gives_the_triple_model(tmp_path):
  c = reference_yaml_config.get_config(_write(tmp_path / "rnn_args.yaml", tpu_args()))
  counts = parameter_counts(c)
  assert counts == {
    "noise_model": 628_475_392,
    "clean_model": 37_228_073,
    "noisy_model": 21_865_001,
    "total": 687_568_466,
  }
  assert (c.model.kind, c.model.dtype) == ("triple", "bfloat16")
  # Accelerate's count: 32 per core x 8 cores x 2 accumulated micro-batches; validation 32 per core.
  assert (c.data.batch_size, c.optim.grad_accum_steps, c.data.eval_batch_size) == (512, 2, 256)
  assert (c.model.grl_lambda, c.loss.noisy_weight, c.loss.noise_l2_weight) == (0.3, 0.25, 0.01)
  assert c.loss.adversarial_warmup_steps == 500
  config_check.validate(c, n_devices=8, n_processes=1)  # 256 trials per micro-batch over 8 data-parallel cores
  rows = {r.key: r.text for r in reference_args.build(tpu_args(), "x", default.get_config()).rows}
  assert rows["use_tpu"].startswith("ignored: ") and rows["dataset.num_dataloader_workers"].startswith("ignored: ")
  assert len(rows) == RELEASED_LEAVES + 8


def test_bad_yaml_keys_are_errors_naming_the_key_and_the_file(tmp_path):
  base = default.get_config()

  def error(args, **kw):
    with pytest.raises(reference_args.ReferenceArgsError) as e:
      reference_args.build(args, "runs/rnn_args.yaml", base, **kw)
    return str(e.value)

  args = released_args()
  args["dataset"]["data_transforms"]["smooth_kernel_sd"] = 2
  msg = error(args)
  assert msg.startswith("runs/rnn_args.yaml: unknown key 'dataset.data_transforms.smooth_kernel_sd'")
  assert "did you mean 'dataset.data_transforms.smooth_kernel_std'" in msg
  args = released_args()
  args["optimizer"] = "adamw"
  assert "unknown key 'optimizer'" in error(args)
  args = released_args()
  args["model"]["input_network"] = 1
  assert "'model.input_network' must be a mapping" in error(args)
  args = released_args()
  del args["model"]["n_units"]
  assert "missing model.n_units" in error(args)
  args = tpu_args()
  args["model"]["kind"] = "gru"
  assert "adversarial.enabled = true contradicts model.kind = gru" in error(args)
  args = released_args()
  args["dataset"]["feature_subset"] = [0, 1]
  assert "dataset.feature_subset = [0, 1]" in error(args, strict=False)  # the inputs: an error even on import
  # Training settings b2t_jax does not reproduce: errors when training from the file, warnings on import.
  args = released_args()
  args.update(early_stopping=True, lr_decay_steps_day=50_000)
  msg = error(args)
  assert "early_stopping = True" in msg and "lr_decay_steps_day = 50000" in msg
  warned = reference_args.build(args, "x", base, strict=False).warnings
  assert len(warned) == 2
  # Through the config file (as config_flags calls it): the same error.
  path = _write(tmp_path / "bad.yaml", {**released_args(), "gpu_numbr": "0"})
  with pytest.raises(reference_args.ReferenceArgsError, match=f"{path}: unknown key 'gpu_numbr'.*'gpu_number'"):
    reference_yaml_config.get_config(path)


def test_summary_cli_prints_the_mapping_then_the_counts(tmp_path):
  path = _write(tmp_path / "tpu_args.yaml", tpu_args())
  cmd = [sys.executable, "-m", "b2t_jax.main", f"--config={ROOT}/configs/reference_yaml.py:{path}"]
  p = subprocess.run(
    [*cmd, "--config.mode=summary", "--config.optim.grad_accum_steps=4"],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert p.returncode == 0, p.stderr[-3000:]
  lines = p.stdout.strip().splitlines()
  assert json.loads(lines[-1])["total"] == 687_568_466
  assert lines[0] == f"{path} -> b2t_jax config ({RELEASED_LEAVES + 8} keys):"
  table = {line.split()[0]: line for line in lines[1:-2]}
  assert len(table) == RELEASED_LEAVES + 8
  assert "model.grl_lambda = 0.3" in table["adversarial.grl_lambda"]
  assert "[now optim.grad_accum_steps = 4 by --config override]" in table["gradient_accumulation_steps"]
  assert "ignored: JAX places work" in table["gpu_number"]
  # An unknown key: one `error:` line naming it and the file, exit status 1, no traceback.
  bad = _write(tmp_path / "bad.yaml", {**tpu_args(), "use_tpuu": True})
  p = subprocess.run(
    [sys.executable, "-m", "b2t_jax.main", f"--config={ROOT}/configs/reference_yaml.py:{bad}", "--config.mode=summary"],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert p.returncode == 1
  assert p.stderr.strip().splitlines()[-1] == (
    f"error: {bad}: unknown key 'use_tpuu' (did you mean 'use_tpu'?): it is not a key of the reference's "
    "rnn_args.yaml, of its TPU variant or of b2t_jax's importer (b2t_jax/reference_args.py lists them); remove it "
    "or fix its spelling"
  )
  assert "Traceback" not in p.stderr


def test_to_args_is_read_back_to_the_same_fields():
  """Export's args.yaml -> import's mapping: every field it carries comes back (smoothing off, accumulation, triple)."""
  for kind in ("gru", "triple"):
    c = reference_args.apply(
      default.get_config(), reference_args.build(tpu_args(), "x", default.get_config()).overrides
    )
    c.model.kind = kind
    c.aug.smooth_kernel_std = 0.0
    c.data.sessions = T15_SESSIONS[:5]
    args = reference_args.to_args(c, "/out")
    assert args["checkpoint_dir"] == "/out/checkpoint" and args["dataset"]["dataset_probability_val"] == [0, 1, 1, 1, 1]
    mapping = reference_args.build(args, "args.yaml", default.get_config())
    assert mapping.kind == kind and not mapping.warnings
    fields = {f: v for f, v in mapping.overrides.items() if f != "data.eval_batch_size"}
    assert len(fields) > 30
    for f, v in fields.items():
      *sections, name = f.split(".")
      node = c
      for s in sections:
        node = node[s]
      assert node[name] == v, f


# --- export: a b2t_jax workdir -> the reference's checkpoint folder ---
N_DAYS, F, HIDDEN, LAYERS = 3, 8, 16, 2


def _small_config(kind: str):
  c = default.get_config()
  c.model.kind = kind
  c.data.sessions = T15_SESSIONS[:N_DAYS]
  c.data.n_features, c.model.hidden, c.model.n_layers = F, HIDDEN, LAYERS
  c.data.time_buckets = (64,)
  c.optim.warmup_steps = c.optim.day_warmup_steps = 1
  c.optim.decay_steps = 10
  return c


def _make_workdir(workdir: str, config) -> tuple:
  """A workdir as training leaves it: random params, two optimizer steps (day 1 absent from the first, day 2 from the
  second, so the day layers' step counts differ), best and latest checkpoints, config.json."""
  exp = Experiment(config, mesh=sharding.create_mesh((1, 1), jax.devices()[:1]))  # one device: quick compiles
  state = exp.init_state()
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda p: p + np.float32(0.1) * rng.normal(size=p.shape).astype(np.float32), jax.device_get(state.params)
  )

  @jax.jit
  def step(params, opt_state, grads, present):
    updates, opt_state = exp.tx.update(grads, opt_state, params, day_present=present)
    return optax.apply_updates(params, updates), opt_state

  opt_state = state.opt_state
  for present in ([True, False, True], [True, True, False]):
    grads = jax.tree.map(lambda p: np.float32(0.01) * rng.normal(size=p.shape).astype(np.float32), params)
    params, opt_state = step(params, opt_state, grads, np.asarray(present))
  state = state.replace(step=jnp.asarray(2, jnp.int32), params=params, opt_state=opt_state)
  ckpts = ckpt_lib.Checkpoints(workdir)
  ckpts.maybe_save_best(state, 0.25, 1.5)
  ckpts.save_latest(state, force=True)
  ckpts.wait()
  ckpts.close()
  workdir_lib.record_config(config, workdir)
  return exp, state


def _reference_adamw(module, saved: dict) -> tuple:
  """The reference trainer's AdamW groups (create_optimizer: biases without decay, day layers at their own
  learning rate, the rest) over `module`'s parameters, and its LambdaLR, loaded with the exported states."""
  named = list(module.named_parameters())
  bias = [p for n, p in named if "gru.bias" in n or "out.bias" in n]
  day = [p for n, p in named if "day_" in n]
  other = [p for n, p in named if "day_" not in n and "gru.bias" not in n and "out.bias" not in n]
  groups = [{"params": bias, "weight_decay": 0}, {"params": day, "lr": 0.005, "weight_decay": 0}, {"params": other}]
  opt = torch.optim.AdamW(groups, lr=0.005, betas=(0.9, 0.999), eps=0.1, weight_decay=0.001, fused=True)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 1.0] * 3)
  opt.load_state_dict(saved["optimizer_state_dict"])
  sched.load_state_dict(saved["scheduler_state_dict"])
  for g in opt.param_groups:
    g["fused"] = False  # the same update by the foreach kernel, which checks shapes (the fused one does not)
  return opt, sched


def test_gru_export_loads_into_torch_and_imports_back_bit_for_bit(tmp_path):
  config = _small_config("gru")
  workdir, out = str(tmp_path / "work"), str(tmp_path / "exported")
  exp, state = _make_workdir(workdir, config)
  p = subprocess.run(
    [sys.executable, "tools/export_torch_checkpoint.py", f"--workdir={workdir}", f"--out={out}"],
    cwd=ROOT,
    env=cpu_env(1),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert p.returncode == 0, p.stderr[-3000:]
  assert "exported a gru model (" in p.stdout and "step 2, val_PER=0.2500 val_loss=1.5000" in p.stdout
  saved = torch.load(os.path.join(out, "checkpoint", "best_checkpoint"), weights_only=True)
  assert sorted(saved) == ["model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "val_PER", "val_loss"]

  # A torch module in the reference's GRUDecoder layout loads it strictly and computes our logits.
  model = TorchGRUDecoder(N_DAYS, F, HIDDEN, LAYERS, 41)
  model.load_state_dict(saved["model_state_dict"], strict=True)
  assert list(saved["model_state_dict"]) == list(model.state_dict())  # torch's own key order (h0 first)
  x = np.random.default_rng(1).normal(size=(N_DAYS, 60, F)).astype(np.float32)
  day = np.array([2, 0, 1], np.int32)
  ours = np.asarray(exp.model.apply({"params": state.params}, x, day, train=False))
  with torch.no_grad():
    ref = model.eval()(torch.from_numpy(x), torch.from_numpy(day)).numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  assert np.abs(ref).max() > 0.1

  # The reference's optimizer resumes from it: one step from the same gradient gives our next params.
  opt, sched = _reference_adamw(model, saved)
  assert sched.last_epoch == 2 and int(opt.state[model.h0]["step"]) == 2  # the main group's count
  day_steps = [int(opt.state[model.day_weights[d]]["step"]) for d in range(N_DAYS)]
  assert day_steps == [2, 1, 1]  # each day layer its own count
  rng = np.random.default_rng(2)
  grads = jax.tree.map(lambda p: np.float32(0.01) * rng.normal(size=p.shape).astype(np.float32), state.params)
  g_sd = params_to_state_dict(grads, config)
  model.train()
  for name, prm in model.named_parameters():
    prm.grad = torch.from_numpy(g_sd[name])
  opt.step()
  updates, _ = exp.tx.update(grads, state.opt_state, state.params, day_present=jnp.ones(N_DAYS, bool))
  ours_next = optax.apply_updates(state.params, updates)
  ref_next = state_dict_to_params({k: v.detach().numpy() for k, v in model.state_dict().items()}, config)
  diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), ours_next, ref_next)))
  moved = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), ours_next, state.params)))
  assert diff < 1e-6 and moved > 1e-4, (diff, moved)  # the step moved params ~100x more than the two sides differ

  # import(export(W)) restores W's params bit for bit, with W's settings.
  info = import_checkpoint(
    os.path.join(out, "checkpoint", "best_checkpoint"), str(tmp_path / "back"), default.get_config()
  )
  back = _load_config(info["config"])
  for f in ("model.hidden", "model.n_layers", "data.sessions", "data.n_features", "optim.decay_steps", "optim.eps"):
    section, name = f.split(".")
    assert back[section][name] == config[section][name], f
  ckpts = ckpt_lib.Checkpoints(str(tmp_path / "back"), read_only=True)
  restored = ckpts.restore(Experiment(back).abstract_state(), "best")
  ckpts.close()
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored.params, state.params)


def test_triple_export_and_refusals(tmp_path):
  config = _small_config("triple")
  exp, state = _make_workdir(str(tmp_path / "work"), config)
  info = export_workdir(str(tmp_path / "work"), str(tmp_path / "out"), key_prefix="_orig_mod.")
  saved = torch.load(info["checkpoint"], weights_only=True)
  model = TorchTriple(N_DAYS, F, HIDDEN, 41)
  sd = {k.removeprefix("_orig_mod."): v for k, v in saved["model_state_dict"].items()}
  assert len(sd) == len(saved["model_state_dict"])  # every key carried the torch.compile prefix
  model.load_state_dict(sd, strict=True)
  x = np.random.default_rng(1).normal(size=(N_DAYS, 40, F)).astype(np.float32)
  day = np.array([1, 2, 0], np.int32)
  ours = np.asarray(exp.model.apply({"params": state.params}, x, day, train=False, mode="inference"))
  with torch.no_grad():
    ref = model.eval()(torch.from_numpy(x), torch.from_numpy(day)).numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  args = yaml.safe_load(open(info["args"]))
  assert args["model"]["kind"] == "triple" and args["adversarial"]["enabled"] is True
  back = import_checkpoint(info["checkpoint"], str(tmp_path / "back"), default.get_config())
  assert back["kind"] == "triple"
  ckpts = ckpt_lib.Checkpoints(str(tmp_path / "back"), read_only=True)
  restored = ckpts.restore(Experiment(config).abstract_state(), "latest")
  ckpts.close()
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored.params, state.params)

  # What the reference cannot hold is refused by name, before anything is read or written.
  bad = copy.deepcopy(config)
  bad.model.patch_features, bad.data.feature_pool, bad.train.n_models = 16, 2, 3
  bad.model.encoder, bad.model.targets = "transformer", "diphone"
  found = "\n".join(refusals(bad))
  for field in ("patch_features=16", "feature_pool=2", "n_models=3", "encoder='transformer'", "targets='diphone'"):
    assert f"config.model.{field}" in found or f"config.data.{field}" in found or f"config.train.{field}" in found
  assert not refusals(config)
  ok = copy.deepcopy(config)
  ok.model.encoder, ok.model.targets = "gru", "phoneme"
  assert not refusals(ok)
  workdir = tmp_path / "projected"
  workdir.mkdir()
  projected = copy.deepcopy(config)
  projected.model.patch_features = 16
  workdir_lib.record_config(projected, str(workdir))
  with pytest.raises(CheckpointExportError, match="config.model.patch_features=16: the reference patches"):
    export_workdir(str(workdir), str(tmp_path / "never"))
  assert not os.path.exists(tmp_path / "never")


# --- the reference's command lines ---


@pytest.fixture(scope="module")
def three_day_dataset(synthetic_dir, tmp_path_factory):
  """The synthetic tree's three sessions, prepared with a three-session list (a small YAML's sessions)."""
  return tfds_b2t.prepare(synthetic_dir, str(tmp_path_factory.mktemp("tfds3")), sessions=T15_SESSIONS[:N_DAYS])


def _tiny_yaml(path, dataset_dir: str, output_dir: str, per_core: int, **top) -> str:
  """The released key set at test size: a 512-feature, 16-unit, one-layer GRU, two steps."""
  args = released_args()
  args["model"].update(n_units=HIDDEN, n_layers=1)
  args.update(use_amp=False, output_dir=output_dir, num_training_batches=2, batches_per_train_log=1, **top)
  args.update(lr_warmup_steps=1, lr_warmup_steps_day=1, lr_decay_steps=4, lr_decay_steps_day=4)
  args["dataset"].update(batch_size=per_core, days_per_batch=2, dataset_dir=dataset_dir)
  args["dataset"].update(sessions=list(T15_SESSIONS[:N_DAYS]), dataset_probability_val=[0, 1, 1])
  return _write(path, args)


def _tool(*args, cwd, devices: int = 1):
  env = cpu_env(devices)
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, "tools", args[0]), *args[1:]],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )


@pytest.mark.slow
def test_reference_commands_train_evaluate_and_launch(tmp_path, three_day_dataset):
  _tiny_yaml(tmp_path / "rnn_args.yaml", three_day_dataset, "trained_models/tiny", per_core=8)
  p = _tool("train_model.py", "--config_path", "rnn_args.yaml", cwd=tmp_path)
  assert p.returncode == 0, p.stderr[-3000:]
  assert p.stdout.strip().splitlines()[-1].startswith("final step=2 ")
  model_path = tmp_path / "trained_models" / "tiny"  # output_dir, from the current directory
  recorded = json.loads((model_path / "config.json").read_text())
  assert recorded["reference_yaml"] == str(tmp_path / "rnn_args.yaml") and recorded["model.hidden"] == HIDDEN

  p = _tool(
    "evaluate_model.py",
    "--model_path",
    "trained_models/tiny",
    "--data_dir",
    three_day_dataset,
    "--eval_type",
    "val",
    cwd=tmp_path,
  )
  assert p.returncode == 0, p.stderr[-3000:]
  (csv,) = glob.glob(str(model_path / "baseline_rnn_val_predicted_sentences_*.csv"))
  assert p.stdout.strip().splitlines()[-1] == f"predicted sentences: {csv}"
  assert len(os.path.basename(csv)) == len("baseline_rnn_val_predicted_sentences_YYYYMMDD_HHMMSS.csv")
  rows = open(csv).read().splitlines()
  assert rows[0] == "id,text" and [r.split(",")[0] for r in rows[1:]] == [str(i) for i in range(len(rows) - 1)]
  assert rows == open(model_path / "infer_val" / "submission.csv").read().splitlines()
  assert len(rows) - 1 == 8  # the val trials of the two sessions that have some

  # The launcher: 8 cores of per-core batches, or a refusal that says how to simulate them.
  _tiny_yaml(tmp_path / "tpu.yaml", three_day_dataset, "trained_models/tpu", per_core=1, num_tpu_cores=4)
  p = _tool("launch_tpu_training.py", "--config", "tpu.yaml", "--num_cores", "8", cwd=tmp_path, devices=1)
  assert p.returncode == 1
  assert "--num_cores 8 needs 8 local accelerator cores; this machine has 1 device(s)" in p.stderr
  assert "XLA_FLAGS=--xla_force_host_platform_device_count=8 python" in p.stderr
  assert not (tmp_path / "trained_models" / "tpu").exists()
  p = _tool("launch_tpu_training.py", "--config", "tpu.yaml", "--num_cores", "8", cwd=tmp_path, devices=8)
  assert p.returncode == 0, p.stderr[-3000:]
  lines = p.stdout.strip().splitlines()
  assert lines[0].startswith("training on 8 cpu cores: 8 trials per optimizer step in 1 micro-batch(es)")
  assert lines[-1].startswith("final step=2 ")
  recorded = json.loads((tmp_path / "trained_models" / "tpu" / "config.json").read_text())
  assert recorded["data.batch_size"] == 8  # 1 per core x --num_cores 8 (the file's num_tpu_cores: 4)
