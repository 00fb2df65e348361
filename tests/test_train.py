"""The jitted train step over a mesh, resume, preemption and the full-size TPU step's compilation."""

import dataclasses
import glob
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, tiny_config
from test_losses import frames_needed, hand_batch

from b2t_jax import checkpoint as ckpt_lib
from b2t_jax import evaluation, experiment, main, sharding, train
from b2t_jax.data import pipeline, prepare, sampler
from b2t_jax.optim import DAY_PARAMS, DayAdamState
from b2t_jax.sharding import create_mesh
from configs import default, tpu_v4


def _batches(config, n):
  """Training batches 0..n-1 as training reads them, built once so that every Experiment given them sees the same."""
  split = pipeline.open_split(prepare.find_dataset_dir(config.data.data_dir), config, "train", train=True)
  return [pipeline.train_host_batch(split, config, k) for k in range(n)]


def _losses(exp, batches):
  state = exp.init_state()
  out = []
  for b in batches:
    state, m = exp.train_step(state, sharding.shard_batch(b, exp.mesh))
    out.append(float(m["loss"]))
  return np.array(out), state


def _updates(exp, batches):
  """(losses, parameter change over the steps of `batches`, final state) from the initial state."""
  init = jax.tree.map(np.asarray, exp.init_state().params)
  out, state = _losses(exp, batches)
  return out, jax.tree.map(lambda p, p0: np.asarray(p) - p0, state.params, init), state


def live_lr(config):
  """Equivalence tests train at the peak learning rate from step 0 (no warm-up, whose first step has LR 0) and
  without dropout, so that every step they compare moves every parameter."""
  config.optim.warmup_steps = config.optim.day_warmup_steps = 0
  config.model.input_dropout = config.model.rnn_dropout = 0.0
  return config


def assert_same_updates(ref, other, rel: float = 1e-3, moved: float = 1e-5):
  """Two runs' parameter changes (`_updates`) agree leaf by leaf: every leaf moved (max |change| > `moved`) and
  max |other - ref| <= `rel` x max |ref|. fp32 reduction-order differences stay near 1e-5 of a leaf's update;
  a gradient from half the batch (a missing all-reduce), a dropped ensemble member or a wrong gradient moves
  leaves by 10-100%."""
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ref)[0], jax.tree.leaves(other)):
    scale = np.abs(a).max()
    assert scale > moved, f"{jax.tree_util.keystr(path)} did not move ({scale})"
    err = np.abs(np.asarray(b) - a).max()
    assert err <= rel * scale, f"{jax.tree_util.keystr(path)}: {err} > {rel} x {scale}"


@pytest.mark.slow
def test_eight_devices_match_one_device(tiny):
  """Three steps at the peak LR: 8 devices (batch split over 'data') update every parameter as one device does."""
  assert jax.device_count() == 8
  live_lr(tiny)
  batches = _batches(tiny, 3)
  one, d1, _ = _updates(experiment.Experiment(tiny, mesh=create_mesh((1, 1), jax.devices()[:1])), batches)
  eight, d8, _ = _updates(experiment.Experiment(tiny), batches)
  # Same math, different reduction order across devices: fp32 round-off only.
  np.testing.assert_allclose(eight, one, rtol=1e-5)
  assert one[0] > 1.0 and np.all(np.isfinite(one))
  assert_same_updates(d1, d8)


@pytest.mark.slow
def test_gradient_accumulation_matches_large_batch(tiny):
  """Three real steps (LR > 0 from step 0, the noise-L2 term on) with 2 micro-batches land on the same
  parameters as with one batch: averaged, last-micro-batch-only or mis-split gradients would not."""
  live_lr(tiny)  # also: micro-batches draw their own dropout masks
  tiny.loss.noise_l2_weight = 1.0
  batches = _batches(tiny, 3)
  full, d_full, _ = _updates(experiment.Experiment(tiny), batches)
  tiny.optim.grad_accum_steps = 2
  accum, d_accum, _ = _updates(experiment.Experiment(tiny, mesh=create_mesh((4, 1), jax.devices()[:4])), batches)
  np.testing.assert_allclose(accum, full, rtol=1e-5)
  # fp32 round-off of another summation order (measured: 2e-5 of the largest update); the noise-L2 term
  # counted twice moves some leaves by 1.4%, averaged micro-batch gradients by 12%
  assert_same_updates(d_full, d_accum, moved=1e-4)


def test_days_absent_from_a_batch_keep_their_parameters_and_moments():
  """SPEC §4 through real steps: a day with no real trial in the batch (padding rows do not count) keeps its day
  weights, biases and both Adam moments bit-identical; each day's Adam count is the steps it was present."""
  c = tiny_config()
  c.optim.warmup_steps = c.optim.day_warmup_steps = 0
  exp = experiment.Experiment(c)
  n_days = len(c.data.sessions)
  # days of the 8 rows per step; the last two rows are padding (weight 0) of a day absent that step
  plan = [(0, 0, 1, 1, 0, 1, 2, 2), (1, 1, 2, 2, 1, 2, 0, 0), (0, 0, 2, 2, 0, 2, 1, 1)]
  state = exp.init_state()
  steps_present = np.zeros(n_days, int)

  def day_leaves(s):  # {path: value} of every day-indexed parameter and moment, on the host
    found = {}
    adam = [
      x
      for x in jax.tree.leaves(s.opt_state, is_leaf=lambda x: isinstance(x, DayAdamState))
      if isinstance(x, DayAdamState)
    ]
    assert len(adam) == 1
    for name, tree in (("param", s.params), ("mu", adam[0].mu), ("nu", adam[0].nu)):
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jax.tree_util.keystr(path).split("'")[-2] in DAY_PARAMS:
          found[name + jax.tree_util.keystr(path)] = np.asarray(leaf)
    return found, {
      jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(adam[0].count)[0]
    }

  before, _ = day_leaves(state)
  assert len(before) == 3 * 2 * len(DAY_PARAMS)  # two front ends (noise, clean) x params, mu, nu
  for days in plan:
    batch = hand_batch(c, exp.n_features, days)
    present = np.zeros(n_days, bool)
    present[[d for d, w in zip(days, batch["weight"]) if w > 0]] = True
    steps_present += present
    state, _ = exp.train_step(state, sharding.shard_batch(batch, exp.mesh))
    after, counts = day_leaves(state)
    for key, old in before.items():
      new = after[key]
      np.testing.assert_array_equal(new[~present], old[~present], err_msg=key)  # bit-identical
      assert np.all(np.any(new[present] != old[present], axis=tuple(range(1, new.ndim)))), key
    for key, count in counts.items():
      np.testing.assert_array_equal(count, steps_present, err_msg=key)
    before = after


def test_evaluate_counts_only_real_rows(tiny, tmp_path):
  """Eval batches padded with weight-0 rows (day 0, no frames) give what unpadded one-trial batches give: no
  phantom day, no padding row counted infeasible. Day 0 is left out of the split so that its padding rows
  would show as a day of their own."""
  val = experiment.open_data(tiny, str(tmp_path), ("val",))["val"]
  val = dataclasses.replace(val, keep=val.keep & (val.day != 0))
  kept = np.flatnonzero(val.keep)
  trials = val.read(kept)
  # a patch stride at which some, not all, real trials are too short for their labels (counted, not trained on)
  need = np.array([frames_needed(t.labels) for t in trials])
  frames = np.array([t.n_time_steps for t in trials])
  for stride in range(tiny.model.patch_stride, tiny.model.patch_size + 1):
    infeasible = int(np.sum((frames - tiny.model.patch_size) // stride + 1 < need))
    if 0 < infeasible < len(trials):
      break
  assert 0 < infeasible < len(trials)
  tiny.model.patch_stride = stride
  days = sorted(set(val.day[kept].tolist()))
  assert 0 not in days and any(len(i) % tiny.data.eval_batch_size for i in val.day_indices().values())
  padded_exp = experiment.Experiment(tiny)
  params = jax.device_get(padded_exp.init_state().params)
  padded = evaluation.evaluate(padded_exp, params, val, pipeline.eval_plan(val, tiny.data.eval_batch_size))
  tiny.data.eval_batch_size = 1
  single_exp = experiment.Experiment(tiny, mesh=create_mesh((1, 1), jax.devices()[:1]))
  single = evaluation.evaluate(single_exp, params, val, pipeline.eval_plan(val, 1))
  assert sorted(padded["per_day"]) == sorted(single["per_day"]) == days
  assert padded["val_infeasible"] == single["val_infeasible"] == infeasible
  assert padded["val_per"] == pytest.approx(single["val_per"], abs=1e-9)
  assert padded["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
  assert single["val_loss"] > 0


@pytest.mark.slow
def test_resume_gives_bit_identical_next_steps(tiny, tmp_path):
  tiny.train.num_steps = 3
  interrupted = train.train_and_evaluate(tiny, str(tmp_path / "a"))
  assert interrupted["step"] == 3 and os.path.isdir(tmp_path / "a" / "checkpoints" / "3")
  tiny.train.num_steps = 5
  resumed = train.train_and_evaluate(tiny, str(tmp_path / "a"))
  straight = train.train_and_evaluate(tiny, str(tmp_path / "b"))
  assert resumed["step"] == straight["step"] == 5
  assert resumed["train"]["loss"] == straight["train"]["loss"]  # bit-identical on CPU
  assert resumed["val_per"] == straight["val_per"] and resumed["val_loss"] == straight["val_loss"]
  assert 0.0 <= straight["val_per"] and np.isfinite(straight["val_loss"])
  assert os.path.isdir(tmp_path / "b" / "best")
  last = _batches(tiny, 5)[4]  # log_every=1: the last window is step 4 alone
  rows, t = last["features"].shape[:2]
  assert straight["train"]["pad_waste"] == pytest.approx(1 - last["n_time_steps"].sum() / (rows * t))
  assert straight["train"]["real_bins_per_sec"] > 0


def test_sigterm_saves_stops_and_exits_for_a_restart(tiny, tmp_path, monkeypatch, capsys):
  tiny.train.num_steps = 50
  tiny.data.prefetch = 0  # sample on the training thread, so that "step 2" below is the step in flight
  real = sampler.train_batch_indices

  def preempt_at_step_2(seed, step, *a, **k):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(seed, step, *a, **k)

  monkeypatch.setattr(sampler, "train_batch_indices", preempt_at_step_2)
  before = signal.getsignal(signal.SIGTERM)
  # A non-zero status makes a Kubernetes Job / SLURM requeue restart the run instead of calling it done.
  assert main.run(tiny, str(tmp_path)) == tiny.train.preempt_exit_code == 75
  out = capsys.readouterr().out
  assert "stopped at step 3 on SIGTERM" in out  # finished the step in flight, then stopped
  assert "final" not in out and "val_per" not in out  # no stale evaluation under the stop step
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]
  assert signal.getsignal(signal.SIGTERM) == before  # the handler is restored
  assert not os.path.exists(tmp_path / "lock")  # released for the restart


def test_batch_that_does_not_divide_devices_is_explained(tiny):
  exp = experiment.Experiment(tiny)
  bad = {"features": np.zeros((6, 256, 8), np.float32)}
  with pytest.raises(ValueError, match="6 trials does not divide the 8 devices"):
    sharding.shard_batch(bad, exp.mesh)


@pytest.mark.slow
def test_tpu_v4_train_step_compiles_at_full_size():
  config = tpu_v4.get_config()
  exp = experiment.Experiment(config)
  lowered = exp.train_step.lower(exp.abstract_state(), exp.example_batch(config.data.batch_size, 256))
  compiled = lowered.compile()
  mem = compiled.memory_analysis()
  assert mem is not None and mem.argument_size_in_bytes > 687_568_466 * 4 * 3 / 8  # params + 2 moments


def test_unreadable_latest_checkpoint_falls_back_to_previous(tiny, tmp_path, caplog):
  tiny.train.num_steps = 3
  tiny.train.checkpoint_every = 1
  train.train_and_evaluate(tiny, str(tmp_path))
  ckpt_dir = tmp_path / "checkpoints"
  assert sorted(os.listdir(ckpt_dir)) == ["2", "3"]
  for root, _, files in os.walk(ckpt_dir / "3" / "state"):  # corrupt every array file of step 3
    for f in files:
      if "manifest" in f or f.startswith("d") or "ocdbt" in root:
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"garbage")
  os.makedirs(ckpt_dir / "4.orbax-checkpoint-tmp")  # a save interrupted half-way
  exp = experiment.Experiment(tiny)
  ckpts = ckpt_lib.Checkpoints(str(tmp_path))
  with caplog.at_level("WARNING"):
    state = ckpts.restore(exp.abstract_state())
  assert int(state.step) == 2
  assert "unreadable" in caplog.text


# Native threads (pthreads with no Python thread state, as tensorstore's under orbax) calling into Python while
# the run's profiler starts and stops its traces. argv: workdir, reps, profile_python.
_PROFILE_UNDER_NATIVE_THREADS = """
import ctypes, sys, threading
import jax, jax.numpy as jnp
from b2t_jax import train
workdir, reps, python = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "True"
libc = ctypes.CDLL(None)
ENTRY = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)
enter_python = ENTRY(lambda _: sum(range(50)) and None)  # each call: a new thread state, made without the GIL
libc.pthread_create.argtypes = [ctypes.POINTER(ctypes.c_ulong), ctypes.c_void_p, ENTRY, ctypes.c_void_p]
libc.pthread_join.argtypes = [ctypes.c_ulong, ctypes.c_void_p]
done = threading.Event()
def spawn():
  while not done.is_set():
    ids = [ctypes.c_ulong() for _ in range(4)]
    for t in ids:  # a thread not created would be joined as thread 0, a segfault of its own
      if libc.pthread_create(ctypes.byref(t), None, enter_python, None):
        raise OSError("pthread_create failed")
    for t in ids:
      libc.pthread_join(t.value, None)
spawners = [threading.Thread(target=spawn) for _ in range(2)]
for t in spawners:
  t.start()
x = jnp.ones((32, 32))
try:
  for _ in range(reps):
    profile = train._Profile(workdir, 0, 1, python)
    profile.before(train.PROFILE_WARMUP)
    with profile.annotation(train.PROFILE_WARMUP):
      y = x @ x
    profile.after(train.PROFILE_WARMUP, y)
finally:  # an error here ends the spawners too, so that it is reported instead of a hang
  done.set()
  for t in spawners:
    t.join()
print("traced", reps)
"""


def test_profiling_survives_native_threads_entering_python(tmp_path):
  """A run's profile (config.train.profile_steps) while threads that are not Python's enter Python, as orbax's
  tensorstore threads do: 300 traces started and stopped, the process alive and traces written. With XLA's Python
  tracer on (config.train.profile_python=True) this test failed with SIGSEGV in 5 of 5 tries on Python 3.11
  (jaxlib 0.10.2)."""
  python = default.get_config().train.profile_python
  p = subprocess.run(
    [sys.executable, "-c", _PROFILE_UNDER_NATIVE_THREADS, str(tmp_path), "300", str(python)],
    cwd=tmp_path,  # a crash's core file, if the system writes one, lands here
    env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "PYTHONFAULTHANDLER": "1"},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
  assert p.stdout.split() == ["traced", "300"]
  assert len(glob.glob(str(tmp_path / "plugins" / "profile" / "*" / "*.xplane.pb"))) >= 1
