"""PyTorch -> b2t_jax import: a torch model with the SPEC §6 layout, saved in the reference's checkpoint format,
gives the same logits and greedy phonemes through our restored model; bad checkpoints give named errors."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch  # a plain import: the [test] extra installs torch, so a missing one fails the suite, never skips it
import yaml
from conftest import ROOT, cpu_env
from torch import nn as tnn

from b2t_jax import checkpoint as ckpt_lib
from b2t_jax import metrics, sharding
from b2t_jax.data import pipeline
from b2t_jax.data.augment import gaussian_kernel
from b2t_jax.data.t15 import T15_SESSIONS
from b2t_jax.decoding.streaming import StreamingDecoder
from b2t_jax.experiment import Experiment, open_data
from b2t_jax.torch_import import CheckpointImportError, import_checkpoint, state_dict_to_params
from configs import default

N_DAYS, FEATURES, HIDDEN, LAYERS, CLASSES, SIZE, STRIDE = 3, 512, 32, 2, 41, 14, 4


def _torch_front(x, day, weights, biases, size, stride):
  """Day layer (x @ W, SPEC §3.1) + softsign + patches via unfold over time, as the reference does."""
  w = torch.stack([weights[int(i)] for i in day])
  b = torch.cat([biases[int(i)] for i in day]).unsqueeze(1)
  x = torch.nn.functional.softsign(torch.einsum("btd,bdk->btk", x, w) + b)
  x = x.permute(0, 2, 1).unfold(2, size, stride).permute(0, 2, 3, 1)  # (B, P, size, F)
  return x.reshape(x.shape[0], x.shape[1], -1)


class TorchSub(tnn.Module):
  """Optional day layers -> nn.GRU with a learned h0 shared by its layers -> optional Linear head."""

  def __init__(self, n_days, f, d_in, hidden, layers, classes):
    super().__init__()
    self.hidden, self.layers = hidden, layers
    if n_days:
      self.day_weights = tnn.ParameterList([tnn.Parameter(torch.eye(f)) for _ in range(n_days)])
      self.day_biases = tnn.ParameterList([tnn.Parameter(torch.zeros(1, f)) for _ in range(n_days)])
    self.gru = tnn.GRU(d_in, hidden, layers, batch_first=True)
    if classes:
      self.out = tnn.Linear(hidden, classes)
    self.h0 = tnn.Parameter(torch.zeros(1, 1, hidden))

  def front(self, x, day):
    return _torch_front(x, day, self.day_weights, self.day_biases, SIZE, STRIDE)

  def rnn(self, x):
    return self.gru(x, self.h0.expand(self.layers, x.shape[0], self.hidden).contiguous())[0]


class TorchGRUDecoder(TorchSub):
  """An independent torch model with the reference's parameter layout (SPEC §3.1-3.3, §6)."""

  def __init__(self, n_days, f, hidden, layers, classes):
    super().__init__(n_days, f, f * SIZE, hidden, layers, classes)

  def forward(self, x, day):
    return self.out(self.rnn(self.front(x, day)))


class TorchTriple(tnn.Module):
  """The TripleGRUDecoder key layout of b2t_jax/torch_import/__init__.py; forward = inference mode (clean logits)."""

  def __init__(self, n_days, f, hidden, classes):
    super().__init__()
    w = f * SIZE
    self.noise_model = TorchSub(n_days, f, w, w, 2, 0)
    self.clean_model = TorchSub(n_days, f, w, hidden, 3, classes)
    self.noisy_model = TorchSub(0, f, w, hidden, 2, classes)

  def forward(self, x, day):
    noise = self.noise_model.rnn(self.noise_model.front(x, day))
    return self.clean_model.out(self.clean_model.rnn(self.clean_model.front(x, day) - noise))


def _perturb(m):
  with torch.no_grad():  # move every parameter off its init so that a transposed or swapped tensor shows
    for name, p in m.named_parameters():
      p.add_((0.02 if "day_weights" in name else 0.05) * torch.randn_like(p))
      if name.endswith("h0"):
        p.normal_(0.0, 0.5)
  return m.eval()


def _torch_model(seed=0):
  torch.manual_seed(seed)
  return _perturb(TorchGRUDecoder(N_DAYS, FEATURES, HIDDEN, LAYERS, CLASSES))


def _args_yaml(features=FEATURES, **model_extra):
  return {
    "model": {
      "n_input_features": features,
      "n_units": HIDDEN,
      "rnn_dropout": 0.4,
      "n_layers": LAYERS,
      "patch_size": SIZE,
      "patch_stride": STRIDE,
      "input_network": {"n_input_layers": 1, "input_layer_sizes": [features], "input_layer_dropout": 0.2},
      **model_extra,
    },
    "lr_max": 0.005,
    "lr_min": 0.0001,
    "lr_decay_steps": 120000,
    "lr_warmup_steps": 1000,
    "epsilon": 0.1,
    "seed": 10,
    "init_checkpoint_path": "None",
    "num_training_batches": 120000,
    "dataset": {
      "data_transforms": {
        "white_noise_std": 1.0,
        "smooth_data": True,
        "smooth_kernel_std": 2,
        "smooth_kernel_size": 100,
        "random_cut": 3,
      },
      "n_classes": CLASSES,
      "batch_size": 64,
      "days_per_batch": 4,
      "feature_subset": None,
      "sessions": list(T15_SESSIONS[:N_DAYS]),
    },
  }


def _save_reference(model, folder, *, prefix="_orig_mod.", args=None):
  """The reference trainer's files: checkpoint_dir/best_checkpoint (torch.save dict) + args.yaml."""
  os.makedirs(folder, exist_ok=True)
  opt = torch.optim.AdamW(model.parameters(), lr=0.005, eps=0.1)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 1.0])
  # One training step fills the optimizer state (exp_avg, exp_avg_sq, step tensors) as in a real checkpoint.
  f = model.clean_model.day_weights[0].shape[0] if isinstance(model, TorchTriple) else model.day_weights[0].shape[0]
  model(torch.randn(1, SIZE + STRIDE, f), torch.tensor([0])).square().mean().backward()
  opt.step()
  sched.step()
  model.zero_grad()
  sd = {prefix + k: v for k, v in model.state_dict().items()}
  path = os.path.join(folder, "best_checkpoint")
  # val_loss is np.mean(...) in the reference: a numpy scalar, which weights_only must be allowed to read.
  torch.save(
    {
      "model_state_dict": sd,
      "optimizer_state_dict": opt.state_dict(),
      "scheduler_state_dict": sched.state_dict(),
      "val_PER": 0.25,
      "val_loss": np.mean([1.0, 2.0]),
    },
    path,
  )
  with open(os.path.join(folder, "args.yaml"), "w") as f:
    yaml.safe_dump(args or _args_yaml(), f)
  return path


def _load_config(path):
  namespace = {}
  exec(compile(open(path).read(), path, "exec"), namespace)  # the written config file, as config_flags runs it
  return namespace["get_config"]()


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """The user's path: the reference's files -> tools/import_torch_checkpoint.py -> a workdir."""
  tmp = tmp_path_factory.mktemp("torch_import")
  model = _torch_model()
  ckpt = _save_reference(model, str(tmp / "checkpoint"))
  p = subprocess.run(
    [sys.executable, "tools/import_torch_checkpoint.py", f"--checkpoint={ckpt}", f"--out={tmp / 'work'}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert p.returncode == 0, p.stderr[-3000:]
  assert "imported a gru model (" in p.stdout and "val_PER=0.2500 val_loss=1.5000" in p.stdout
  return model, str(tmp / "work")


def test_import_matches_torch_logits_and_phonemes(imported, synthetic_dir, tmp_path):
  model, workdir = imported
  config = _load_config(os.path.join(workdir, "config.py"))
  config.data.data_dir = synthetic_dir
  config.data.cache_dir = str(tmp_path / "cache")
  assert config.model.hidden == HIDDEN and config.model.n_layers == LAYERS
  assert config.data.sessions == T15_SESSIONS[:N_DAYS] and config.aug.smooth_kernel_std == 2.0

  exp = Experiment(config)
  ckpts = ckpt_lib.Checkpoints(workdir)
  state = ckpts.restore(exp.abstract_state(), "best")
  ckpts.close()
  assert state is not None and int(state.step) == 0

  # Raw model: same input on both sides.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(N_DAYS, 50, FEATURES)).astype(np.float32)
  day = np.arange(N_DAYS, dtype=np.int32)
  ours = np.asarray(exp.model.apply({"params": state.params}, x, day, train=False))
  with torch.no_grad():
    ref = model(torch.from_numpy(x), torch.from_numpy(day)).numpy()
  assert ours.shape == ref.shape == (N_DAYS, (50 - SIZE) // STRIDE + 1, CLASSES)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  assert np.abs(ref).max() > 0.1  # the comparison is not between two near-zero tensors

  # Our eval path (smoothing + padded batch + sharded eval step) against torch on torch-smoothed input.
  split = open_data(config, str(tmp_path / "work"), ("val",))["val"]
  idx = np.flatnonzero(split.keep)[: config.data.eval_batch_size]
  trials = split.read(idx)
  batch = pipeline.eval_host_batch(split, config, idx)
  out = sharding.to_host(exp.eval_step(state.params, sharding.shard_batch(batch, exp.mesh)))
  taps = torch.from_numpy(gaussian_kernel(2.0, 100, 0.01))
  n_same = 0
  for r, trial in enumerate(trials):
    xt = torch.from_numpy(trial.features).T[:, None, :]  # (F, 1, T): depthwise conv over time
    smoothed = torch.nn.functional.conv1d(xt, taps.view(1, 1, -1), padding="same")[:, 0, :].T
    with torch.no_grad():
      ref_ids = model(smoothed[None], torch.tensor([trial.day]))[0].argmax(-1).numpy()
    n = int(out["input_lens"][r])
    assert n == len(ref_ids)
    ours_seq = metrics.greedy_decode(out["pred"][r], n)
    assert ours_seq == metrics.greedy_decode(ref_ids, n)
    n_same += len(ours_seq) > 0
  assert n_same > 0  # some trial decodes to a non-empty phoneme sequence

  # Streaming on the restored (mesh-sharded) params follows the torch model too.
  trial = trials[0]
  decoder = StreamingDecoder(config, state.params, trial.day)
  streamed = np.concatenate(
    [decoder.feed(trial.features[i : i + 4]) for i in range(0, trial.features.shape[0], 4)] + [decoder.finish()]
  )
  xt = torch.from_numpy(trial.features).T[:, None, :]
  smoothed = torch.nn.functional.conv1d(xt, taps.view(1, 1, -1), padding="same")[:, 0, :].T
  with torch.no_grad():
    ref = model(smoothed[None], torch.tensor([trial.day]))[0].numpy()
  np.testing.assert_allclose(streamed, ref, atol=1e-4, rtol=0)


def test_infer_cli_runs_on_the_imported_workdir(imported, synthetic_dir, tmp_path):
  """The issue's flow: import, then `mode=infer` on the written config and checkpoint decodes a dataset."""
  _, workdir = imported
  env = cpu_env(1)
  p = subprocess.run(
    [
      sys.executable,
      "-m",
      "b2t_jax.main",
      f"--config={workdir}/config.py",
      f"--workdir={workdir}",
      "--config.mode=infer",
      f"--config.data.data_dir={synthetic_dir}",
      f"--config.data.cache_dir={tmp_path / 'cache'}",
      "--config.decode.beam_size=10",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert p.returncode == 0, p.stderr[-3000:]
  out_dir = os.path.join(workdir, "infer_val")
  with open(os.path.join(out_dir, "metrics.json")) as f:
    metrics_json = json.load(f)
  assert p.stdout.strip().splitlines()[-1] == (
    f"greedy_per={metrics_json['greedy_per']:.4f} wer_no_lm={metrics_json['wer_no_lm']:.4f} wer_lm=n/a"
    f" oov_rate={metrics_json['oov_rate']:.4f}"
  )
  with open(os.path.join(out_dir, "trials.jsonl")) as f:
    trials = [json.loads(line) for line in f]
  with open(os.path.join(out_dir, "submission.csv"), newline="") as f:
    rows = list(csv.reader(f))
  # every val trial of the fixture (3 sessions, the first without val data, 4 val trials each), in order, with the
  # words decoded for it (no LM given: the lexicon-only decoding)
  assert len(trials) == metrics_json["n_trials"] == 8
  assert rows == [["id", "text"]] + [[str(t["id"]), t["words_no_lm"]] for t in trials]
  assert [t["id"] for t in trials] == list(range(8))


def test_corrupted_checkpoint_is_named(tmp_path):
  path = _save_reference(_torch_model(), str(tmp_path / "ckpt"))
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(CheckpointImportError, match=f"{path}: cannot read as a PyTorch checkpoint"):
    import_checkpoint(path, str(tmp_path / "work"), default.get_config())
  assert not os.path.exists(tmp_path / "work")  # nothing half-written


def test_untrusted_pickle_is_refused(tmp_path):
  path = str(tmp_path / "best_checkpoint")
  torch.save({"model_state_dict": {}, "payload": TorchGRUDecoder}, path)  # a class: not loadable weights-only
  with open(tmp_path / "args.yaml", "w") as f:
    yaml.safe_dump(_args_yaml(), f)
  with pytest.raises(CheckpointImportError, match="not unpickled from an untrusted file"):
    import_checkpoint(path, str(tmp_path / "work"), default.get_config())


def test_layout_errors_name_every_key():
  config = default.get_config()
  config.data.sessions = T15_SESSIONS[:N_DAYS]
  config.model.hidden, config.model.n_layers = HIDDEN, LAYERS
  sd = {k: v.numpy() for k, v in _torch_model().state_dict().items()}
  sd = {"module." + k: v for k, v in sd.items()}
  params = state_dict_to_params(sd, config)  # the intact dict converts (with its DataParallel prefix)
  assert params["gru"]["layer_0"]["w_ih"].shape == (SIZE * FEATURES, 3, HIDDEN)
  del sd["module.gru.bias_hh_l1"]
  sd["module.gru.weight_hh_l0"] = sd["module.gru.weight_hh_l0"].T[:, : HIDDEN * 2]
  sd["module.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(CheckpointImportError) as e:
    state_dict_to_params(sd, config, source="ckpt.pt")
  msg = str(e.value)
  assert "missing keys (1): gru.bias_hh_l1" in msg
  assert "unexpected keys (1): extra.weight" in msg
  assert f"gru.weight_hh_l0: ({HIDDEN}, {2 * HIDDEN}), expected ({3 * HIDDEN}, {HIDDEN})" in msg


def test_wrong_args_yaml_size_is_a_shape_error(tmp_path):
  args = _args_yaml()
  args["model"]["n_units"] = HIDDEN * 2
  path = _save_reference(_torch_model(), str(tmp_path / "ckpt"), prefix="", args=args)
  with pytest.raises(CheckpointImportError, match=r"h0: \(1, 1, 32\), expected \(1, 1, 64\)"):
    import_checkpoint(path, str(tmp_path / "work"), default.get_config())
  del args["model"]["n_units"]
  with open(tmp_path / "ckpt" / "args.yaml", "w") as f:
    yaml.safe_dump(args, f)
  with pytest.raises(CheckpointImportError, match="missing model.n_units"):
    import_checkpoint(path, str(tmp_path / "work"), default.get_config())


def test_triple_import_matches_torch(tmp_path):
  f = 8  # a 112-wide noise GRU keeps the test small
  torch.manual_seed(1)
  model = _perturb(TorchTriple(N_DAYS, f, HIDDEN, CLASSES))
  path = _save_reference(model, str(tmp_path / "ckpt"), prefix="module.", args=_args_yaml(f))
  info = import_checkpoint(path, str(tmp_path / "work"), default.get_config())
  assert info["kind"] == "triple"  # detected from the noise_model.* keys
  config = _load_config(info["config"])
  assert (config.model.noise_layers, config.model.clean_layers, config.model.noisy_layers) == (2, 3, 2)
  exp = Experiment(config)
  ckpts = ckpt_lib.Checkpoints(str(tmp_path / "work"))
  state = ckpts.restore(exp.abstract_state(), "latest")
  ckpts.close()
  x = np.random.default_rng(0).normal(size=(N_DAYS, 40, f)).astype(np.float32)
  day = np.array([2, 0, 1], np.int32)
  ours = np.asarray(exp.model.apply({"params": state.params}, x, day, train=False, mode="inference"))
  with torch.no_grad():
    ref = model(torch.from_numpy(x), torch.from_numpy(day)).numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  assert np.abs(ref).max() > 0.1
  # The noisy decoder (training only) converts too: its head is the torch head, transposed.
  np.testing.assert_array_equal(
    np.asarray(state.params["noisy_model"]["out"]["kernel"]), model.noisy_model.out.weight.detach().numpy().T
  )
