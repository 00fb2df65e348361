"""Hard to break: the workdir's config record, the non-finite guard, the workdir lock, up-front config checks and
read-only eval (SIGTERM: tests/test_train.py and tests/test_main.py)."""

import json
import os
import shutil
import socket
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import best_meta, tiny_config

from b2t_jax import checkpoint as ckpt_lib
from b2t_jax import config_check, evaluation, experiment, train
from b2t_jax.steps import NonFiniteError, TrainState
from b2t_jax.workdir import CONFIG_FILE, LOCK_FILE, ConfigMismatch, WorkdirLock, WorkdirLocked


@pytest.fixture(scope="module")
def trained(prepared_dir, tmp_path_factory):
  """A workdir after 2 tiny training steps (latest checkpoint 2, best 1, config.json)."""
  config = tiny_config(prepared_dir)
  config.train.num_steps = 2
  work = str(tmp_path_factory.mktemp("trained"))
  train.train_and_evaluate(config, work)
  return work


def _tree(root):
  return {
    os.path.relpath(os.path.join(d, f), root): (
      os.stat(os.path.join(d, f)).st_mtime_ns,
      os.stat(os.path.join(d, f)).st_size,
    )
    for d, _, files in os.walk(root)
    for f in files
  }


def test_resume_with_a_changed_model_is_refused_naming_every_field(trained, prepared_dir, tmp_path):
  work = str(tmp_path / "work")
  shutil.copytree(trained, work)
  c = tiny_config(prepared_dir)
  c.train.num_steps, c.train.log_every = 3, 2  # safe to change
  c.model.hidden, c.data.seed = 32, 5  # not
  with pytest.raises(ConfigMismatch) as e:
    train.train_and_evaluate(c, work)
  msg = str(e.value)
  assert "model.hidden: 16 (workdir) -> 32 (now)" in msg and "data.seed: 1 (workdir) -> 5 (now)" in msg
  assert "num_steps" not in msg and "log_every" not in msg
  assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["2"]

  # Without the record (a workdir of an older version) the checkpoints still do not fit: an error, not step 0.
  os.remove(os.path.join(work, CONFIG_FILE))
  with pytest.raises(ckpt_lib.CheckpointError, match=r"none of the checkpoints .* restores"):
    train.train_and_evaluate(c, work)
  assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["2"]
  assert not os.path.exists(os.path.join(work, CONFIG_FILE))  # the wrong config was not recorded


def test_eval_runs_beside_a_live_run_and_writes_only_to_its_out_dir(trained, prepared_dir, tmp_path):
  lock = os.path.join(trained, LOCK_FILE)
  with open(lock, "w") as f:  # a training run that is alive on another host
    json.dump({"host": "other-host", "pid": 1, "started": time.time(), "heartbeat": time.time()}, f)
  before = _tree(trained)
  c = tiny_config(prepared_dir)
  c.mode, c.eval.out_dir = "eval", str(tmp_path / "eval")
  result = evaluation.evaluate_checkpoint(c, trained)
  after = _tree(trained)
  os.remove(lock)
  assert after == before
  assert [str(result["step"])] == os.listdir(os.path.join(trained, "best"))
  assert result["val_per"] == best_meta(trained)["val_per"]  # re-measured exactly as training recorded it
  assert json.load(open(tmp_path / "eval" / "metrics.json"))["val_per"] == result["val_per"]
  assert json.load(open(tmp_path / "eval" / "skipped_trials.json"))["val"]["kept"] == 8  # the fixture's val split


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tiny, tmp_path, caplog):
  tiny.aug.constant_offset_std = 1e39  # beyond float32: inf offsets, every step's gradients are NaN
  tiny.train.num_steps, tiny.train.checkpoint_every, tiny.train.max_nonfinite_steps = 6, 1, 3
  with (
    caplog.at_level("INFO", logger="absl"),
    pytest.raises(NonFiniteError, match="3 consecutive non-finite training steps"),
  ):
    train.train_and_evaluate(tiny, str(tmp_path))
  assert "nonfinite_steps 2" in caplog.text
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]  # step 3 raised before its save
  exp = experiment.Experiment(tiny)
  ckpts = ckpt_lib.Checkpoints(str(tmp_path), read_only=True)
  saved = ckpts.restore(exp.abstract_state())
  ckpts.close()
  init = exp.init_state()
  assert int(saved.step) == 2 and int(saved.opt_state.total_notfinite) == 2
  # Skipped updates: params and Adam moments are still those of step 0.
  for a, b in zip(
    jax.tree.leaves((init.params, init.opt_state.inner_state)),
    jax.tree.leaves((saved.params, saved.opt_state.inner_state)),
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_best_rule_ignores_nan_and_nonfinite_states_are_never_saved(tmp_path):
  def state(step, w):
    return TrainState(
      step=jnp.int32(step), params={"w": jnp.asarray(w, jnp.float32)}, opt_state=(), rng=jnp.zeros(2, jnp.uint32)
    )

  ckpts = ckpt_lib.Checkpoints(str(tmp_path))
  assert ckpts.maybe_save_best(state(1, [1.0]), 0.5, 2.0)
  assert not ckpts.maybe_save_best(state(2, [1.0]), 0.5, float("nan"))  # PER tie, NaN loss
  assert not ckpts.maybe_save_best(state(3, [1.0]), float("nan"), 0.1)
  assert ckpts.maybe_save_best(state(4, [1.0]), 0.5, 1.0)
  with pytest.raises(NonFiniteError, match="non-finite"):
    ckpts.save_latest(state(5, [1.0, np.inf]))
  with pytest.raises(NonFiniteError, match="non-finite"):
    ckpts.maybe_save_best(state(6, [np.nan]), 0.1, 0.1)
  ckpts.wait()
  assert ckpts.best.all_steps() == [4] and ckpts.latest.all_steps() == []
  ckpts.close()


def test_busy_workdir_is_refused_and_a_dead_holder_is_taken_over(tiny, tmp_path, caplog):
  path = tmp_path / LOCK_FILE
  holder = subprocess.Popen(["sleep", "120"])
  try:
    path.write_text(
      json.dumps({"host": socket.gethostname(), "pid": holder.pid, "started": time.time(), "heartbeat": time.time()})
    )
    with pytest.raises(WorkdirLocked, match=f"locked by host {socket.gethostname()} pid {holder.pid}"):
      train.train_and_evaluate(tiny, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [LOCK_FILE]  # refused before touching anything
  finally:
    holder.kill()
    holder.wait()
  lock = WorkdirLock(str(tmp_path), heartbeat_s=30, stale_s=600)
  with caplog.at_level("WARNING"):
    lock.acquire()
  assert f"stale lock {path} of host {socket.gethostname()} pid {holder.pid}: its process is gone" in caplog.text
  assert json.loads(path.read_text())["pid"] == os.getpid()
  lock.release()
  assert not path.exists()

  # Another host's lock: held while its heartbeat is fresh, taken over once older than lock_stale_s.
  path.write_text(json.dumps({"host": "other-host", "pid": 7, "started": 0, "heartbeat": time.time() - 100}))
  with pytest.raises(WorkdirLocked, match="locked by host other-host pid 7"):
    WorkdirLock(str(tmp_path), heartbeat_s=30, stale_s=600).acquire()
  lock = WorkdirLock(str(tmp_path), heartbeat_s=30, stale_s=60)
  lock.acquire()
  assert json.loads(path.read_text())["host"] == socket.gethostname()
  lock.release()


def test_config_problems_name_the_field_and_what_is_allowed(tiny):
  assert config_check.problems(tiny, n_devices=8, n_processes=1) == []
  tiny.data.on_bad_trial = "skpi"
  tiny.optim.grad_accum_steps = 3
  tiny.mesh_shape = (3, -1)
  tiny.aug.white_noise_std = float("nan")
  assert config_check.problems(tiny, n_devices=8, n_processes=1) == [
    "config.data.on_bad_trial='skpi': expected one of error, skip",
    "config.aug.white_noise_std=nan: must be a finite number",
  ]
  tiny.aug.white_noise_std = 1.0
  tiny.data.length_window = 0.0
  assert "config.data.length_window=0.0: give a fraction of each day's trials in (0, 1]" in config_check.problems(
    tiny, n_devices=8, n_processes=1
  )
  tiny.data.length_window = 0.1
  with pytest.raises(config_check.ConfigError) as e:
    config_check.validate(tiny, n_devices=8, n_processes=1)
  assert str(e.value).splitlines()[1:] == [
    "  config.data.on_bad_trial='skpi': expected one of error, skip",
    "  config.optim.grad_accum_steps=3 must divide config.data.batch_size=8",
    "  config.mesh_shape=(3, -1): give (data, model) sizes whose product is the 8 devices (at most one -1, "
    "which takes the rest)",
  ]
  tiny.data.on_bad_trial, tiny.optim.grad_accum_steps, tiny.mesh_shape = "skip", 2, (-1, 1)
  assert config_check.problems(tiny, n_devices=8, n_processes=3) == [
    "config.data.batch_size=8 / config.optim.grad_accum_steps=2 = 4 trials per micro-batch must be a multiple "
    "of the 8 devices of the 'data' axis",
    "config.data.batch_size=8 must be a multiple of the 3 processes",
    "config.data.eval_batch_size=8 must be a multiple of the 3 processes",
  ]
