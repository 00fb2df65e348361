"""mode=calibrate: session-list extension, day-layer initialisation, which parameters the fit may move, and the
calibrated workdir read back by eval and streaming."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from b2t_jax import calibrate, config_check, evaluation, experiment, main, optim, steps, train
from b2t_jax.data import pipeline
from b2t_jax.data.synthetic import make_synthetic_dataset
from b2t_jax.data.t15 import T15_SESSIONS
from b2t_jax.decoding.streaming import StreamingDecoder

NEW_SESSION = "t15.2025.06.01"  # not in the t15 list: calibration must append it (day index 45)


def test_extend_sessions_appends_unknown_sessions_and_keeps_known_indices():
  sessions, days = calibrate.extend_sessions(("a", "b", "c"), ["d", "b", "e"])
  assert sessions == ("a", "b", "c", "d", "e")
  assert days == [3, 1, 4]
  assert calibrate.extend_sessions(("a",), ["a"]) == (("a",), [0])


def _day_tree(rng):
  return {
    "front": {"day_weights": rng.normal(size=(3, 4, 4)).astype(np.float32), "day_biases": rng.normal(size=(3, 4))},
    "head": {"kernel": rng.normal(size=(4, 2)).astype(np.float32)},
  }


@pytest.mark.parametrize("init", ["identity", "last", "mean"])
def test_extend_day_params_initialises_new_rows_from_the_trained_ones(init):
  params = _day_tree(np.random.default_rng(0))
  trained = np.array([True, False, True, False, False])  # day 1 never trained; days 3, 4 are new
  out = calibrate.extend_day_params(params, 5, [3, 4], init, trained)
  w, b = out["front"]["day_weights"], out["front"]["day_biases"]
  assert w.shape == (5, 4, 4) and b.shape == (5, 4)
  np.testing.assert_array_equal(w[:3], params["front"]["day_weights"])  # old rows untouched, bit for bit
  np.testing.assert_array_equal(b[:3], params["front"]["day_biases"])
  np.testing.assert_array_equal(out["head"]["kernel"], params["head"]["kernel"])
  old_w, old_b = params["front"]["day_weights"], params["front"]["day_biases"]
  want_w, want_b = {
    "identity": (np.eye(4), np.zeros(4)),
    "last": (old_w[2], old_b[2]),
    "mean": ((old_w[0] + old_w[2]) / 2, (old_b[0] + old_b[2]) / 2),  # the untrained day 1 is left out
  }[init]
  for d in (3, 4):
    np.testing.assert_allclose(w[d], want_w, rtol=1e-6)
    np.testing.assert_allclose(b[d], want_b, rtol=1e-6)


def test_trained_days_reads_the_day_adam_step_counts(tiny):
  exp = experiment.Experiment(tiny)
  state = exp.init_state()
  assert optim.trained_days(state.opt_state) is None  # a fresh state says nothing
  grads = jax.tree.map(jnp.ones_like, state.params)
  present = jnp.zeros(len(tiny.data.sessions), bool).at[jnp.array([1, 4])].set(True)
  _, opt_state = exp.tx.update(grads, state.opt_state, state.params, day_present=present)
  np.testing.assert_array_equal(np.flatnonzero(optim.trained_days(opt_state)), [1, 4])


@pytest.mark.parametrize("fit_all", [False, True])
def test_calibration_optimizer_moves_only_the_present_day_rows(tiny, fit_all):
  tiny.calibrate.fit_all = fit_all
  exp = experiment.Experiment(tiny, tx=calibrate.calibration_optimizer(tiny))
  state = exp.init_state()
  grads = jax.tree.map(jnp.ones_like, state.params)
  present = jnp.zeros(len(tiny.data.sessions), bool).at[7].set(True)
  updates, _ = exp.tx.update(grads, state.opt_state, state.params, day_present=present)
  groups = optim.param_groups(state.params)
  for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(groups)):
    u = np.asarray(u)
    if g == "day":
      assert np.all(u[7] != 0) and not np.any(np.delete(u, 7, axis=0))
    else:
      assert np.any(u) == fit_all


def test_calibrate_mode_needs_its_folders(tiny):
  tiny.mode = "calibrate"
  with pytest.raises(config_check.ConfigError, match="calibrate.data_dir is empty.*\n.*calibrate.out_dir is empty"):
    config_check.validate(tiny)
  tiny.calibrate.data_dir, tiny.calibrate.out_dir, tiny.calibrate.curve = "x", "y", "1,five"
  with pytest.raises(config_check.ConfigError, match="calibrate.curve='1,five'"):
    config_check.validate(tiny)
  tiny.calibrate.curve, tiny.train.n_models = "", 3
  with pytest.raises(config_check.ConfigError, match="train.n_models=3: calibrate one model"):
    config_check.validate(tiny)


def _load_config_file(path: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location("calibrated_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.slow
def test_calibration_fits_only_the_new_day_layer_and_its_workdir_restores(tiny, tmp_path):
  trained_dir = str(tmp_path / "trained")
  tiny.train.num_steps = 3
  train.train_and_evaluate(tiny, trained_dir)
  new_dir = make_synthetic_dataset(
    str(tmp_path / "new_day"), (*T15_SESSIONS, NEW_SESSION), trials_per_session=16, seed=0, days=[45]
  )
  cfg = ml_collections.ConfigDict(tiny.to_dict())
  cfg.mode = "calibrate"
  cal = cfg.calibrate
  cal.data_dir, cal.out_dir = new_dir, str(tmp_path / "calibrated")
  cal.n_sentences, cal.holdout_fraction, cal.max_steps, cal.eval_every, cal.patience = 8, 0.25, 4, 2, 5
  cal.batch_size, cal.curve = 8, "4,8"
  config_check.validate(cfg)
  result = calibrate.run_calibration(ml_collections.FrozenConfigDict(cfg), trained_dir)

  (row,) = result["sessions"]
  assert (row["session"], row["day"], row["n_sentences"], row["steps"]) == (NEW_SESSION, 45, 8, 4)
  curve = [(r["n_sentences"], r["per_before"]) for r in result["curve"]]
  assert curve == [(4, row["per_before"]), (8, row["per_before"])]
  out = cal.out_dir
  for name in ("config.py", "config.json", calibrate.RESULT_FILE, calibrate.CURVE_FILE, "calibration.png"):
    assert os.path.isfile(os.path.join(out, name)), name
  report = json.loads(open(os.path.join(out, calibrate.RESULT_FILE)).read())
  assert [h[0] for h in report["history"]] == [0, 2, 4]  # held-out checks before the fit and every 2 steps

  # The written config.py rebuilds the recorded config, with the new session appended.
  out_config = _load_config_file(os.path.join(out, "config.py"))
  assert tuple(out_config.data.sessions) == (*T15_SESSIONS, NEW_SESSION)
  assert out_config.data.data_dir == new_dir and out_config.mode == "eval"

  # Only day 45's layer moved from its init (the default 'last': the most recent day that trained); every other
  # parameter and every other day row is bit-identical to the trained workdir's.
  trained = evaluation.restore_for_reading(experiment.Experiment(tiny), trained_dir, "best")
  known = optim.trained_days(trained.opt_state)
  exp = experiment.Experiment(out_config)
  after = evaluation.restore_for_reading(exp, out, "best").params
  n_day_leaves = 0
  for path, a in jax.tree_util.tree_leaves_with_path(after):
    a, b = np.asarray(a), np.asarray(_at(trained.params, path))
    if optim._leaf_name(path) in optim.DAY_PARAMS:
      n_day_leaves += 1
      np.testing.assert_array_equal(a[:45], b)
      assert np.abs(a[45] - b[np.flatnonzero(known)[-1]]).max() > 1e-4  # moved from init 'last
    else:
      np.testing.assert_array_equal(a, b)
  # The calibrated workdir remembers the trained days and the new one (a later calibration reads them).
  restored = evaluation.restore_for_reading(exp, out, "best")
  np.testing.assert_array_equal(optim.trained_days(restored.opt_state), np.append(known, True))
  assert n_day_leaves == 4  # the triple's noise and clean models each have day weights and biases

  # mode=eval on the calibrated workdir measures the new session's PER reported by the calibration.
  main.run(ml_collections.FrozenConfigDict(out_config), out)
  metrics = json.loads(open(os.path.join(out, "eval", "metrics.json")).read())
  assert metrics["val_per"] == pytest.approx(row["per_after"], abs=1e-9)

  # Streaming decodes the new day: its rows equal the offline logits of the same trial.
  val = experiment.open_data(out_config, str(tmp_path / "scratch"), ("val",))["val"]
  first = int(np.flatnonzero(val.keep)[0])
  record = val.source.__getitems__([first])[0]  # the file's 512 columns, before the tiny config's pooling
  assert int(record["day"]) == 45
  decoder = StreamingDecoder(out_config, after, day=45)
  rows = np.concatenate([decoder.feed(np.asarray(record["features"])), decoder.finish()])
  batch = pipeline.eval_host_batch(val, out_config, np.array([first]))
  logits, lens = jax.jit(lambda p, b: steps.inference_logits(p, b, model=exp.model, config=out_config))(after, batch)
  np.testing.assert_allclose(rows, np.asarray(logits)[0, : int(lens[0])], atol=2e-4)


def _at(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


def _index_only_split(days, index_in_file):
  n = len(days)
  return pipeline.DataSplit(
    name="train",
    dataset_dir="",
    source=None,
    day=np.asarray(days),
    n_time_steps=np.full(n, 100),
    label_len=np.ones(n, np.int64),
    ctc_len=np.ones(n, np.int64),
    index_in_file=np.asarray(index_in_file),
    sessions=tuple(T15_SESSIONS),
    feature_pool=1,
    keep=np.ones(n, bool),
    skipped={},
  )


def test_calibration_sentences_are_each_days_first_trials_in_file_order():
  # Records of day 3 are stored out of file order; day 5 is not calibrated.
  split = _index_only_split([3, 3, 5, 3, 3, 3], [4, 0, 0, 1, 3, 2])
  fit, hold = calibrate.sentence_masks(split, [3], n_sentences=4, holdout_fraction=0.25)
  # Day 3 in file order: records 1 (0), 3 (1), 5 (2), 4 (3): the first four, the last of them held out.
  np.testing.assert_array_equal(np.flatnonzero(fit), [1, 3, 5])
  np.testing.assert_array_equal(np.flatnonzero(hold), [4])
  fit, hold = calibrate.sentence_masks(split, [3], n_sentences=2, holdout_fraction=0.2)  # rounds to 0: keep one
  assert fit.sum() == 1 and hold.sum() == 1
  fit, hold = calibrate.sentence_masks(split, [3], n_sentences=1, holdout_fraction=0.2)  # nothing to hold out
  assert fit.sum() == 1 and not hold.any()
  with pytest.raises(Exception, match="has 5 usable train trials, fewer than config.calibrate.n_sentences=6"):
    calibrate.sentence_masks(split, [3], n_sentences=6, holdout_fraction=0.2)
