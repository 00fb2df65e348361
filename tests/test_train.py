"""The jitted train step over a mesh, resume, preemption and the full-size TPU step's compilation."""

import os
import signal

import jax
import numpy as np
import pytest

from b2t_jax import checkpoint as ckpt_lib
from b2t_jax import main, sharding, train
from b2t_jax.data import batching, sampler, t15
from b2t_jax.sharding import create_mesh
from configs import tpu_v4


def _batches(config, n):
  split = t15.load_split_from_config(config, "train")
  days = split.day_indices()
  d = config.data
  return [batching.make_batch(split.trials, sampler.train_batch_indices(d.seed, k, days, d.batch_size,
                                                                      d.days_per_batch),
                              buckets=d.time_buckets, max_label_len=d.max_label_len) for k in range(n)]


def _losses(exp, batches):
  state = exp.init_state()
  out = []
  for b in batches:
    state, m = exp.train_step(state, sharding.shard_batch(b, exp.mesh))
    out.append(float(m["loss"]))
  return np.array(out), state


def test_eight_devices_match_one_device(tiny):
  assert jax.device_count() == 8
  batches = _batches(tiny, 3)
  one, s1 = _losses(train.Experiment(tiny, mesh=create_mesh((1, 1), jax.devices()[:1])), batches)
  eight, s8 = _losses(train.Experiment(tiny), batches)
  # Same math, different reduction order across devices: fp32 round-off only.
  np.testing.assert_allclose(eight, one, rtol=1e-5)
  assert one[0] > 1.0 and np.all(np.isfinite(one))
  leaves1, leaves8 = jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)
  for a, b in zip(leaves1, leaves8):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_matches_large_batch(tiny):
  batches = _batches(tiny, 2)
  tiny.model.input_dropout = tiny.model.rnn_dropout = 0.0   # micro-batches draw their own dropout masks
  full, _ = _losses(train.Experiment(tiny), batches)
  tiny.optim.grad_accum_steps = 2
  accum, _ = _losses(train.Experiment(tiny, mesh=create_mesh((4, 1), jax.devices()[:4])), batches)
  np.testing.assert_allclose(accum, full, rtol=1e-5)


def test_resume_gives_bit_identical_next_steps(tiny, tmp_path):
  tiny.train.num_steps = 3
  interrupted = train.train_and_evaluate(tiny, str(tmp_path / "a"))
  assert interrupted["step"] == 3 and os.path.isdir(tmp_path / "a" / "checkpoints" / "3")
  tiny.train.num_steps = 5
  resumed = train.train_and_evaluate(tiny, str(tmp_path / "a"))
  straight = train.train_and_evaluate(tiny, str(tmp_path / "b"))
  assert resumed["step"] == straight["step"] == 5
  assert resumed["train"]["loss"] == straight["train"]["loss"]       # bit-identical on CPU
  assert resumed["val_per"] == straight["val_per"] and resumed["val_loss"] == straight["val_loss"]
  assert 0.0 <= straight["val_per"] and np.isfinite(straight["val_loss"])
  assert os.path.isdir(tmp_path / "b" / "best")


def test_sigterm_saves_stops_and_exits_for_a_restart(tiny, tmp_path, monkeypatch, capsys):
  tiny.train.num_steps = 50
  tiny.data.prefetch = 0   # sample on the training thread, so that "step 2" below is the step in flight
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
  assert "stopped at step 3 on SIGTERM" in out                 # finished the step in flight, then stopped
  assert "final" not in out and "val_per" not in out           # no stale evaluation under the stop step
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]
  assert signal.getsignal(signal.SIGTERM) == before            # the handler is restored
  assert not os.path.exists(tmp_path / "lock")                 # released for the restart


def test_batch_that_does_not_divide_devices_is_explained(tiny):
  exp = train.Experiment(tiny)
  bad = {"features": np.zeros((6, 256, 8), np.float32)}
  with pytest.raises(ValueError, match="6 trials does not divide the 8 devices"):
    sharding.shard_batch(bad, exp.mesh)


@pytest.mark.slow
def test_tpu_v4_train_step_compiles_at_full_size():
  config = tpu_v4.get_config()
  exp = train.Experiment(config)
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
  for root, _, files in os.walk(ckpt_dir / "3" / "state"):   # corrupt every array file of step 3
    for f in files:
      if "manifest" in f or f.startswith("d") or "ocdbt" in root:
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"garbage")
  os.makedirs(ckpt_dir / "4.orbax-checkpoint-tmp")              # a save interrupted half-way
  exp = train.Experiment(tiny)
  ckpts = ckpt_lib.Checkpoints(str(tmp_path))
  with caplog.at_level("WARNING"):
    state = ckpts.restore(exp.abstract_state())
  assert int(state.step) == 2
  assert "unreadable" in caplog.text
