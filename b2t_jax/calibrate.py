"""Rapid calibration of new recording sessions (mode=calibrate), as in the NEJM 2024 neuroprosthesis: the trained
network stays as it is and each new session gets its own day layer, fitted from its first few sentences.

A day layer is one row of the stacked (n_days, F, F) matrix the front end gathers by day index. Calibration
appends a row for every session of `config.calibrate.data_dir` missing from `config.data.sessions` (a session
already in the list keeps its index and its row is fitted again), initialises the rows (`calibrate.init`:
identity, the most recent trained day's layer, or the mean of the trained days' layers), and fits them with the
day-layer Adam while every other parameter stays frozen (`calibrate.fit_all` fits those too, at a small
learning rate). The first `n_sentences` trials of each session's data_train.hdf5 are the calibration
sentences; a `holdout_fraction` of them stops the fit early (lowest held-out CTC loss); PER before and after
is measured on the session's data_val.hdf5, which the fit never sees. The result is a workdir (config.py,
config.json, best/ and checkpoints/) that mode=eval, mode=infer and streaming read like any other.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from b2t_jax import checkpoint as ckpt_lib
from b2t_jax import optim, sharding
from b2t_jax import workdir as workdir_lib
from b2t_jax.data import pipeline, t15
from b2t_jax.evaluation import evaluate, restore_for_reading
from b2t_jax.experiment import Experiment, open_data
from b2t_jax.steps import TrainState

RESULT_FILE = "calibration.json"  # per session: before/after PER, steps, seconds, init and the fit's history
CURVE_FILE = "calibration.csv"  # with calibrate.curve: one row per (session, N)


def tree_sessions(hdf5_dir: str) -> list[str]:
  """The session folders of an hdf5_data_final-style tree that hold a data_train.hdf5, sorted (t15 names sort
  by date)."""
  if not os.path.isdir(hdf5_dir):
    raise t15.DataError(
      f"config.calibrate.data_dir={hdf5_dir!r} is not a folder; point it at an hdf5_data_final-style tree "
      "holding <session>/data_train.hdf5 and <session>/data_val.hdf5 for each new session"
    )
  found = sorted(e for e in os.listdir(hdf5_dir) if os.path.isfile(os.path.join(hdf5_dir, e, "data_train.hdf5")))
  if not found:
    raise t15.DataError(f"{hdf5_dir}: no <session>/data_train.hdf5 found (config.calibrate.data_dir)")
  return found


def extend_sessions(sessions: tuple[str, ...], new: list[str]) -> tuple[tuple[str, ...], list[int]]:
  """(`sessions` with the sessions of `new` it lacks appended in `new`'s order, each `new` session's day index)."""
  out = list(sessions)
  for s in new:
    if s not in out:
      out.append(s)
  return tuple(out), [out.index(s) for s in new]


def extend_day_params(params: Any, n_days: int, days: list[int], init: str, trained: np.ndarray) -> Any:
  """`params` with every day-layer leaf (optim.DAY_PARAMS, axis 0 the day) grown to `n_days` rows, rows `days`
  set by `init` from the rows `trained` marks (identity: the model's own init, an identity matrix and a zero
  bias; last: the highest trained row; mean: their mean). Other leaves and rows are returned as they were."""
  source = np.flatnonzero(trained)
  if init != "identity" and not len(source):
    raise ValueError(f"config.calibrate.init={init!r} needs at least one trained day layer; use 'identity'")

  def grow(path, leaf):
    name = optim._leaf_name(path)
    if name not in optim.DAY_PARAMS:
      return leaf
    old = np.asarray(jax.device_get(leaf))
    out = np.concatenate([old, np.zeros((n_days - old.shape[0],) + old.shape[1:], old.dtype)])
    if init == "identity":
      row = np.eye(old.shape[1], dtype=old.dtype) if old.ndim == 3 else np.zeros(old.shape[1:], old.dtype)
    elif init == "last":
      row = old[source[-1]]
    else:
      row = old[source].mean(axis=0).astype(old.dtype)
    out[days] = row
    return out

  return jax.tree_util.tree_map_with_path(grow, params)


def calibration_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
  """Day-layer Adam at constant `calibrate.lr` (days absent from a batch are skipped, so only the calibrated
  rows move); the rest frozen (zero updates) or, with `calibrate.fit_all`, AdamW at `calibrate.lr_rest`."""
  cal, o = config.calibrate, config.optim
  rest = optim.adamw(o, cal.lr_rest) if cal.fit_all else optax.set_to_zero()
  day = optim.day_adam(optax.constant_schedule(cal.lr), o.b1, o.b2, o.eps)
  return optim.guarded(optim.grouped_optimizer(o, main=rest, day=day))


def _days_per_batch(batch_size: int, wanted: int) -> int:
  return max(k for k in range(1, wanted + 1) if batch_size % k == 0)


def _configs(config: ml_collections.ConfigDict, sessions: tuple[str, ...], n_new: int):
  """(the calibrated workdir's config: the trained one with the extended session list and the calibration data,
  the config the fit runs with: that one with calibration batches)."""
  out = ml_collections.ConfigDict(config.to_dict())
  out.data.sessions = sessions
  out.data.data_dir = config.calibrate.data_dir
  out.mode = "eval"
  fit = ml_collections.ConfigDict(out.to_dict())
  cal = config.calibrate
  fit.data.batch_size = cal.batch_size
  fit.data.days_per_batch = _days_per_batch(cal.batch_size, min(config.data.days_per_batch, n_new))
  fit.data.seed = cal.seed
  fit.seed = cal.seed
  fit.optim.grad_accum_steps = 1
  return out, fit


def _restrict(split: pipeline.DataSplit, keep: np.ndarray, name: str) -> pipeline.DataSplit:
  return dataclasses.replace(split, keep=keep, name=name)


def sentence_masks(
  split: pipeline.DataSplit, days: list[int], n_sentences: int, holdout_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
  """(fit, held-out) record masks of the train split: per day, its first `n_sentences` kept trials in file order,
  the last round(N * holdout_fraction) of them held out (at least one, and none when N = 1 or the fraction is 0)."""
  fit, hold = np.zeros(len(split.keep), bool), np.zeros(len(split.keep), bool)
  by_day = split.day_indices()
  for d in days:
    idx = by_day.get(d, np.zeros(0, np.int64))
    idx = idx[np.argsort(split.index_in_file[idx], kind="stable")]
    if len(idx) < n_sentences:
      raise t15.DataError(
        f"session {split.sessions[d]} has {len(idx)} usable train trials, fewer than "
        f"config.calibrate.n_sentences={n_sentences}"
      )
    chosen = idx[:n_sentences]
    n_hold = min(max(int(round(n_sentences * holdout_fraction)), 1), n_sentences - 1) if holdout_fraction > 0 else 0
    fit[chosen[: n_sentences - n_hold]] = True
    hold[chosen[n_sentences - n_hold :]] = True
  return fit, hold


@dataclasses.dataclass
class Fit:
  params: Any  # the calibrated params (the held-out best)
  steps: int  # steps taken
  best_step: int  # step of `params`
  seconds: float  # wall time of the fit (compilation of the first fit included)
  history: list  # (step, held-out CTC loss, held-out PER)


def fit_day_layers(
  exp: Experiment, state: TrainState, fit_split: pipeline.DataSplit, hold_split: pipeline.DataSplit | None
) -> Fit:
  """Runs at most `calibrate.max_steps` calibration steps from `state` (donated), keeping the params of the lowest
  held-out CTC loss (evaluated before the first step and every `eval_every` steps) and stopping after
  `patience` evaluations without improvement; without held-out sentences it runs `steps_without_holdout` steps
  (nothing tells when a fit to so few sentences starts to overfit) and returns the last params."""
  cal = exp.config.calibrate
  start = time.time()
  plan = pipeline.eval_plan(hold_split, exp.config.data.eval_batch_size) if hold_split is not None else None
  copy_tree = jax.jit(lambda t: jax.tree.map(jnp.copy, t))  # the step donates the state it is given
  best, best_params, best_step, since, history = np.inf, None, 0, 0, []

  def check(step: int) -> bool:
    nonlocal best, best_params, best_step, since
    r = evaluate(exp, state.params, hold_split, plan)
    history.append((step, r["val_loss"], r["val_per"]))
    logging.info("calibration step %d: held-out loss %.4f, PER %.4f", step, r["val_loss"], r["val_per"])
    if r["val_loss"] < best:
      best, best_params, best_step, since = r["val_loss"], copy_tree(state.params), step, 0
    else:
      since += 1
    return since >= cal.patience

  if plan is not None:
    check(0)
  step = 0
  for step in range(1, (cal.max_steps if plan is not None else min(cal.max_steps, cal.steps_without_holdout)) + 1):
    batch = pipeline.train_host_batch(fit_split, exp.config, step - 1)
    state, _ = exp.train_step(state, sharding.shard_batch(batch, exp.mesh))
    if plan is not None and (step % cal.eval_every == 0 or step == cal.max_steps) and check(step):
      break
  if plan is None:
    best_params, best_step = state.params, step
  jax.block_until_ready(best_params)
  return Fit(best_params, step, best_step, time.time() - start, history)


def _initial_state(exp: Experiment, params: Any, seed: int, step: jax.Array) -> TrainState:
  """The fit's state: fresh calibration moments, at the trained step (the GRL λ ramp continues where it was)."""
  params = jax.device_put(params, exp.param_shardings)
  opt_state = jax.jit(exp.tx.init, out_shardings=exp.state_shardings.opt_state)(params)
  # A fresh array: the step donates its state, and the trained state's step is read again afterwards.
  step = jnp.asarray(int(jax.device_get(step)), jnp.int32)
  return TrainState(step=step, params=params, opt_state=opt_state, rng=jax.random.PRNGKey(seed))


def _write_workdir(
  out_dir: str, config: ml_collections.ConfigDict, params: Any, trained: TrainState, per: float, days: np.ndarray
):
  """The calibrated workdir: its params under best/ and checkpoints/ (at the trained step, with a fresh
  optimizer state: a further `train` run starts its moments afresh, whose day-Adam counts mark `days` as
  trained, so that a later calibration reads them), config.json and config.py."""
  from configs import default  # the installed configs package: the base every written config.py starts from

  exp = Experiment(config)
  params = jax.device_put(params, exp.param_shardings)
  opt_state = jax.jit(exp.tx.init, out_shardings=exp.state_shardings.opt_state)(params)
  opt_state = jax.device_put(optim.mark_trained_days(opt_state, days), exp.state_shardings.opt_state)
  state = TrainState(step=trained.step, params=params, opt_state=opt_state, rng=trained.rng)
  ckpts = ckpt_lib.Checkpoints(out_dir)
  ckpts.maybe_save_best(state, per, float("nan"))
  ckpts.save_latest(state, force=True)
  ckpts.wait()
  ckpts.close()
  if jax.process_index() == 0:
    flat = json.dumps(workdir_lib.flat_config(config), indent=1, sort_keys=True)
    workdir_lib.write_atomically(os.path.join(out_dir, workdir_lib.CONFIG_FILE), flat)
    doc = (
      f"Written by mode=calibrate: the trained workdir's config with {len(config.data.sessions)} sessions\n"
      f"(calibrated from {config.calibrate.data_dir}).\n\n"
      f"Evaluate: python -m b2t_jax.main --config={out_dir}/config.py --workdir={out_dir}\n"
    )
    workdir_lib.write_atomically(
      os.path.join(out_dir, "config.py"), workdir_lib.config_source(config, default.get_config(), doc)
    )


def _plot_curve(path: str, rows: list[dict]) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for session in sorted({r["session"] for r in rows}):
    mine = sorted((r for r in rows if r["session"] == session), key=lambda r: r["n_sentences"])
    ax.plot([r["n_sentences"] for r in mine], [r["per_after"] for r in mine], "o-", label=f"{session} calibrated")
    ax.axhline(mine[0]["per_before"], ls="--", color=ax.lines[-1].get_color(), label=f"{session} before")
  ax.set_xscale("log")
  ax.set_xlabel("calibration sentences")
  ax.set_ylabel("val PER")
  ax.set_ylim(bottom=0)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run_calibration(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """mode=calibrate: calibrates the sessions of `config.calibrate.data_dir` on the best (else latest) checkpoint
  of `workdir` and writes the calibrated workdir `config.calibrate.out_dir`. Returns {'sessions': [{session,
  day, n_sentences, per_before, per_after, steps, best_step, seconds}], 'curve': rows, 'out_dir'}."""
  cal = config.calibrate
  out_dir = cal.out_dir
  for sub in ("best", "checkpoints"):
    d = epath.Path(out_dir) / sub
    if d.is_dir() and any(d.iterdir()):
      raise FileExistsError(
        f"{d} already holds checkpoints; config.calibrate.out_dir must be a new or empty folder (nothing there was "
        "changed)"
      )
  trained_exp = Experiment(config)
  trained = restore_for_reading(trained_exp, workdir, "best")
  new = tree_sessions(cal.data_dir)
  sessions, days = extend_sessions(tuple(config.data.sessions), new)
  known = optim.trained_days(trained.opt_state)
  if known is None:  # an imported or fresh optimizer state: take every day of the trained list as trained
    known = np.ones(len(config.data.sessions), bool)
  known = np.concatenate([known, np.zeros(len(sessions) - len(known), bool)])
  for s, d in zip(new, days):
    if known[d]:
      logging.warning("session %s (day %d) was trained on: its day layer is fitted again from the init", s, d)
  known[days] = False
  out_config, fit_config = _configs(config, sessions, len(days))
  logging.info(
    "calibrating %s as day(s) %s of %d (init %s from %d trained day layers)",
    ", ".join(new),
    days,
    len(sessions),
    cal.init,
    int(known.sum()),
  )

  data = open_data(fit_config, out_dir, ("train", "val"))
  train_split, val_split = data["train"], data["val"]
  missing = [s for s, d in zip(new, days) if d not in val_split.day_indices()]
  if missing:
    raise t15.DataError(
      f"session(s) {missing} of {cal.data_dir} have no usable trial in data_val.hdf5: calibration measures PER "
      "before and after on it"
    )
  exp = Experiment(fit_config, tx=calibration_optimizer(fit_config))
  initial = extend_day_params(trained.params, len(sessions), days, cal.init, known)
  initial = jax.device_put(initial, exp.param_shardings)
  val_plan = pipeline.eval_plan(val_split, fit_config.data.eval_batch_size)
  before = evaluate(exp, initial, val_split, val_plan)["per_day"]

  def calibrate_with(n: int) -> tuple[Fit, dict[int, float]]:
    fit_mask, hold_mask = sentence_masks(train_split, days, n, cal.holdout_fraction)
    hold = _restrict(train_split, hold_mask, "calibration held-out") if hold_mask.any() else None
    state = _initial_state(exp, jax.tree.map(jnp.copy, initial), cal.seed, trained.step)
    result = fit_day_layers(exp, state, _restrict(train_split, fit_mask, "calibration"), hold)
    return result, evaluate(exp, result.params, val_split, val_plan)["per_day"]

  def rows(n: int, result: Fit, after: dict[int, float]) -> list[dict]:
    return [
      {
        "session": s,
        "day": d,
        "n_sentences": n,
        "per_before": float(before[d]),
        "per_after": float(after[d]),
        "steps": result.steps,
        "best_step": result.best_step,
        "seconds": round(result.seconds, 2),
      }
      for s, d in zip(new, days)
    ]

  curve_n = [int(v) for v in cal.curve.split(",") if v.strip()]
  for n in {cal.n_sentences, *curve_n}:  # every N checked before any fit: a bad one must not cost the others
    sentence_masks(train_split, days, n, cal.holdout_fraction)
  main_fit, main_after = calibrate_with(cal.n_sentences)
  summary = rows(cal.n_sentences, main_fit, main_after)
  curve = []
  for n in curve_n:
    curve += summary if n == cal.n_sentences else rows(n, *calibrate_with(n))
  marked = known.copy()
  marked[days] = True  # the calibrated days count as trained for a later calibration of this workdir
  per_after = float(np.mean([r["per_after"] for r in summary]))
  _write_workdir(out_dir, out_config, main_fit.params, trained, per_after, marked)
  if jax.process_index() == 0:
    report = {"init": cal.init, "fit_all": cal.fit_all, "sessions": summary, "history": main_fit.history}
    workdir_lib.write_atomically(os.path.join(out_dir, RESULT_FILE), json.dumps(report, indent=1))
    if curve:
      keys = list(curve[0])
      lines = [",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in curve]
      workdir_lib.write_atomically(os.path.join(out_dir, CURVE_FILE), "\n".join(lines) + "\n")
      _plot_curve(os.path.join(out_dir, "calibration.png"), curve)
  return {"sessions": summary, "curve": curve, "out_dir": out_dir}
