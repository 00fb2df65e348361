"""Hard to break: the workdir's config record, the non-finite guard, the workdir lock, up-front config checks and
read-only eval (SIGTERM: tests/test_train.py and tests/test_main.py)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import best_meta, tiny_config
from test_train import assert_same_updates

from b2t_jax import checkpoint as ckpt_lib
from b2t_jax import config_check, evaluation, experiment, train
from b2t_jax.data import pipeline
from b2t_jax.steps import NonFiniteError, TrainState
from b2t_jax.workdir import ADDED_LATER, CONFIG_FILE, LOCK_FILE, ConfigMismatch, WorkdirLock, WorkdirLocked


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


def _nan_features_at(monkeypatch, steps):
  """Training batches `steps` get NaN features (every gradient of that step non-finite); the others are read as
  usual."""
  real = pipeline.train_host_batch

  def patched(split, config, step, **kw):
    batch = real(split, config, step, **kw)
    return {**batch, "features": np.full_like(batch["features"], np.nan)} if step in steps else batch

  monkeypatch.setattr(pipeline, "train_host_batch", patched)


def _saved_states(config, workdir):
  """step -> state of every latest checkpoint kept in `workdir`."""
  exp = experiment.Experiment(config)
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, exp.abstract_state())
  ckpts = ckpt_lib.Checkpoints(workdir, read_only=True)
  try:
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
    return {s: jax.device_get(ckpts.latest.restore(s, args=args)["state"]) for s in ckpts.latest.all_steps()}
  finally:
    ckpts.close()


def test_a_finite_step_resets_the_nonfinite_count_and_training_recovers(tiny, tmp_path, monkeypatch):
  """NaN batches at steps 1, 2, 4, 5 with max_nonfinite_steps=3: never 3 in a row, so the run completes; each NaN
  step leaves params and Adam moments as they were, each finite step after one updates them again. Steps 1-3 in a
  row stop the run (the same limit counts consecutive steps, not all of them)."""
  tiny.model.kind, tiny.model.n_layers = "gru", 1  # the guard does not depend on the decoder
  tiny.optim.warmup_steps = tiny.optim.day_warmup_steps = 0
  tiny.train.num_steps, tiny.train.checkpoint_every, tiny.train.max_checkpoints = 7, 1, 10
  tiny.train.max_nonfinite_steps = 3
  _nan_features_at(monkeypatch, {1, 2, 4, 5})
  result = train.train_and_evaluate(tiny, str(tmp_path / "ok"))
  assert result["step"] == 7 and np.isfinite(result["val_loss"]) and np.isfinite(result["train"]["loss"])
  saved = _saved_states(tiny, str(tmp_path / "ok"))
  assert sorted(saved) == list(range(1, 8))
  assert int(saved[7].opt_state.total_notfinite) == 4 and int(saved[7].opt_state.notfinite_count) == 0
  equal = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  for done in range(2, 8):  # checkpoint `done` holds the state after step done - 1
    before, after = saved[done - 1], saved[done]
    skipped = done - 1 in (1, 2, 4, 5)
    # a skipped step keeps params and Adam moments bit for bit; a finite step after skipped ones updates them again
    assert equal(before.params, after.params) == skipped, done
    assert equal(before.opt_state.inner_state, after.opt_state.inner_state) == skipped, done
  assert all(np.isfinite(a).all() for a in jax.tree.leaves(saved[7].params))

  monkeypatch.undo()
  _nan_features_at(monkeypatch, {1, 2, 3})
  with pytest.raises(NonFiniteError, match="3 consecutive non-finite training steps .* up to step 4"):
    train.train_and_evaluate(tiny, str(tmp_path / "stops"))


def _gru(config):
  """The tiny config with the one-stack GRU decoder: resume and locking do not depend on the decoder."""
  config.model.kind, config.model.n_layers = "gru", 1
  config.optim.warmup_steps = config.optim.day_warmup_steps = 0
  return config


def test_resume_refuses_a_changed_member_count_and_reads_older_workdirs(tiny, tmp_path):
  work = str(tmp_path / "work")
  _gru(tiny).train.num_steps = 2
  train.train_and_evaluate(tiny, work)
  more = tiny.copy_and_resolve_references()
  more.train.num_steps, more.train.n_models = 3, 2  # train.* may change on resume, but not the member count
  with pytest.raises(ConfigMismatch, match=r"train.n_models: 1 \(workdir\) -> 2 \(now\)"):
    train.train_and_evaluate(more, work)

  # A workdir of an older b2t_jax has no record of the fields added since: each reads as the value that version
  # ran with (workdir.ADDED_LATER), so the same run resumes and a real change of one of them is still refused.
  path = os.path.join(work, CONFIG_FILE)
  recorded = json.load(open(path))
  assert set(ADDED_LATER) <= set(recorded)
  json.dump({k: v for k, v in recorded.items() if k not in ADDED_LATER}, open(path, "w"))
  changed = tiny.copy_and_resolve_references()
  changed.data.length_aware = True
  with pytest.raises(ConfigMismatch, match=r"data.length_aware: False \(workdir\) -> True \(now\)"):
    train.train_and_evaluate(changed, work)
  tiny.train.num_steps = 3
  assert train.train_and_evaluate(tiny, work)["step"] == 3


@pytest.mark.isolated  # a (4, 2) mesh: collectives inside the GRU's loops (conftest.py)
@pytest.mark.parametrize("n_models", [1, 2])
def test_resume_on_another_mesh_with_fsdp_follows_the_straight_run(tiny, tmp_path, n_models):
  """Two steps on (8, 1), then resumed to four on (4, 2) with fsdp: the same losses and parameter updates as four
  steps on (8, 1) (checkpoints hold global arrays; only fp32 reduction orders differ). An ensemble resumes the
  same way, every member."""
  _gru(tiny).train.n_models = n_models
  tiny.train.num_steps = 4
  straight = train.train_and_evaluate(tiny, str(tmp_path / "straight"))
  tiny.train.num_steps = 2
  train.train_and_evaluate(tiny, str(tmp_path / "resumed"))
  tiny.train.num_steps, tiny.mesh_shape, tiny.fsdp, tiny.fsdp_min_size = 4, (4, 2), True, 64
  resumed = train.train_and_evaluate(tiny, str(tmp_path / "resumed"))
  assert resumed["step"] == straight["step"] == 4
  assert resumed["train"]["loss"] == pytest.approx(straight["train"]["loss"], rel=1e-5)
  assert resumed["val_per"] == pytest.approx(straight["val_per"], abs=1e-6)
  exp = experiment.Experiment(tiny)
  init = jax.device_get(exp.init_state().params)
  moved = {}
  for run in ("straight", "resumed"):
    ckpts = ckpt_lib.Checkpoints(str(tmp_path / run), read_only=True)
    params = jax.device_get(ckpts.restore(exp.abstract_state()).params)
    ckpts.close()
    moved[run] = jax.tree.map(lambda a, a0: np.asarray(a) - a0, params, init)
  assert_same_updates(moved["straight"], moved["resumed"])


_RACER = """
import os, sys, time
from b2t_jax.workdir import WorkdirLock, WorkdirLocked
workdir, go = sys.argv[1], sys.argv[2]
while not os.path.exists(go):
  time.sleep(0.001)
try:
  WorkdirLock(workdir, heartbeat_s=30, stale_s=600).acquire()
  print("won", flush=True)
  time.sleep(2)  # hold it (alive) while the other process tries
except WorkdirLocked as e:
  print("lost", e, flush=True)
"""


def test_two_runs_racing_for_one_workdir_lock_let_exactly_one_in(tmp_path):
  for round_ in range(2):
    work, go = tmp_path / f"w{round_}", tmp_path / f"go{round_}"
    procs = [
      subprocess.Popen([sys.executable, "-c", _RACER, str(work), str(go)], stdout=subprocess.PIPE, text=True)
      for _ in range(2)
    ]
    time.sleep(1.0)  # both waiting for the start signal
    go.touch()
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs[0].startswith("lost") and outs[1] == "won", outs
    assert "is locked by host" in outs[0]
