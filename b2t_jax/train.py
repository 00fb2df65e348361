"""The training loop: data -> jitted train step over the mesh -> metrics, evaluation and checkpoints."""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from etils import epath
from jax.experimental import multihost_utils

from b2t_jax import checkpoint as ckpt_lib
from b2t_jax import metrics as metrics_lib
from b2t_jax import sharding
from b2t_jax import workdir as workdir_lib
from b2t_jax.data import batching, source, t15
from b2t_jax.models import create_model
from b2t_jax.optim import guarded_optimizer
from b2t_jax.steps import COUNTER_METRICS, NonFiniteError, TrainState, create_train_state, eval_step, train_step
from b2t_jax.summary import abstract_params


class Experiment:
  """Model, optimizer, mesh and the jitted steps of one config; shared by train, eval and tests."""

  def __init__(self, config: ml_collections.ConfigDict, mesh=None):
    self.config = config
    self.model = create_model(config)
    self.tx = guarded_optimizer(config.optim)
    self.mesh = sharding.create_mesh(config.mesh_shape) if mesh is None else mesh
    repl = sharding.replicated(self.mesh)
    data = sharding.batch_sharding(self.mesh)
    self.param_shardings = sharding.param_shardings(abstract_params(config), self.mesh, config.logical_axis_rules)
    self._state_shapes = jax.eval_shape(self._create_state)
    self.state_shardings = sharding.state_shardings(self._state_shapes, self.param_shardings, self.mesh)
    st = self.state_shardings
    self.train_step = jax.jit(functools.partial(train_step, model=self.model, tx=self.tx, config=config),
                              in_shardings=(st, data), out_shardings=(st, repl), donate_argnums=0)
    self.eval_step = jax.jit(functools.partial(eval_step, model=self.model, config=config),
                             in_shardings=(st.params, data), out_shardings=data)
    self._init = jax.jit(self._create_state, out_shardings=st)

  @property
  def n_features(self) -> int:
    return self.config.data.n_features // self.config.data.feature_pool

  def example_batch(self, rows: int, t: int) -> dict[str, jax.ShapeDtypeStruct]:
    return {"features": jax.ShapeDtypeStruct((rows, t, self.n_features), jnp.float32),
            "n_time_steps": jax.ShapeDtypeStruct((rows,), jnp.int32),
            "labels": jax.ShapeDtypeStruct((rows, self.config.data.max_label_len), jnp.int32),
            "label_lens": jax.ShapeDtypeStruct((rows,), jnp.int32),
            "day": jax.ShapeDtypeStruct((rows,), jnp.int32),
            "weight": jax.ShapeDtypeStruct((rows,), jnp.float32)}

  def _create_state(self) -> TrainState:
    shapes = self.example_batch(1, min(self.config.data.time_buckets))
    example = {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items()}
    return create_train_state(self.model, self.tx, self.config, example)

  def init_state(self) -> TrainState:
    return self._init()

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the train state, without allocating it."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self._state_shapes, self.state_shardings)


def eval_batches(exp: Experiment, split: source.DataSplit, plan: list[np.ndarray]
                 ) -> Iterator[tuple[np.ndarray, dict[str, jax.Array]]]:
  """(global record indices, global device batch) of each eval batch of `plan`, read ahead by the prefetcher;
  each process reads only its rows."""
  config = exp.config
  read = functools.partial(source.eval_host_batch, split, config)
  with batching.Prefetcher(read, plan, config.data.prefetch, config.data.prefetch_workers) as batches:
    for idx, batch in batches:
      yield idx, sharding.shard_batch(batch, exp.mesh)


def evaluate(exp: Experiment, params: Any, split: source.DataSplit, plan: list[np.ndarray]) -> dict[str, Any]:
  """Runs every trial of `plan` (global record indices per eval batch) once; each process reads only its
  rows. Returns aggregate and per-day PER, mean CTC loss and the infeasible count."""
  per = metrics_lib.ErrorRate()
  total_nll, n_feasible, n_infeasible = 0.0, 0, 0
  for _, gb in eval_batches(exp, split, plan):
    out = sharding.to_host({**exp.eval_step(params, gb), "labels": gb["labels"], "label_lens": gb["label_lens"],
                            "day": gb["day"], "weight": gb["weight"]})
    for r in np.flatnonzero(out["weight"] > 0):
      hyp = metrics_lib.greedy_decode(out["pred"][r], int(out["input_lens"][r]))
      per.add(int(out["day"][r]), hyp, out["labels"][r, :out["label_lens"][r]].tolist())
      if out["feasible"][r]:
        total_nll += float(out["nll"][r])
        n_feasible += 1
      else:
        n_infeasible += 1
  return {"val_per": per.rate(), "val_loss": total_nll / max(n_feasible, 1), "val_infeasible": n_infeasible,
          "per_day": per.per_day()}


def open_data(config: ml_collections.ConfigDict, workdir: str, splits=("train", "val"), report_dir: str = ""
              ) -> dict[str, source.DataSplit]:
  """Resolves (and if needed prepares) the dataset, opens `splits` with their load-time checks, checks the
  time buckets and writes the skip counts to REPORT_DIR/skipped_trials.json (default: the workdir)."""
  d = config.data
  dataset_dir = source.resolve_dataset(config, workdir)
  config.data.data_dir = dataset_dir
  out = {name: source.open_split(dataset_dir, config, name, train=name == "train") for name in splits}
  for split in out.values():
    if not len(split):
      raise t15.DataError(f"{dataset_dir}: the {split.name} split has no trials left")
    source.check_buckets(split, d.time_buckets)
  source.write_skips(report_dir or workdir, list(out.values()))
  logging.info("data: %s from %s", ", ".join(f"{len(s)} {s.name}" for s in out.values()), dataset_dir)
  return out


def format_per_day(per_day: dict[int, float], sessions) -> str:
  return "\n".join(f"  {sessions[d]:<16} day {d:>2}  PER {p:.4f}" for d, p in per_day.items())


class _Preemption:
  """SIGTERM (a preempted TPU VM, a cluster scheduler) -> every process stops after the same step.

  One process: a Python handler sets a flag that the loop checks between steps. Several processes: the flag
  would be per process (hosts would stop at different steps and hang in the next collective), so JAX's
  preemption sync manager (started by jax.distributed.initialize; it catches SIGTERM itself) spreads the
  notice through the coordination service, and `reached_preemption_sync_point(step)` turns true on every
  process at the same step. Each call is a local check, not a collective: nothing blocks per step.
  """

  def __init__(self, start: int):
    self.requested = False
    self._previous = None
    self._synced = False
    if jax.process_count() > 1:
      try:
        multihost_utils.reached_preemption_sync_point(start)
        self._synced = True
      except RuntimeError as e:   # jax_enable_preemption_service=False
        logging.warning("JAX's preemption service is off (%s): SIGTERM stops only the process that gets it", e)

  def __enter__(self):
    if self._synced:   # a Python handler would take SIGTERM away from the sync manager
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: leave signals alone
      self._previous = None
    return self

  def should_stop(self, done: int) -> bool:
    """Whether to save and stop after `done` steps; call once per step, on every process."""
    if self._synced and multihost_utils.reached_preemption_sync_point(done):
      logging.warning("preemption notice (SIGTERM on a process of this job): every process stops at step %d", done)
      self.requested = True
    return self.requested

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping after this step")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _window_metrics(history: list[dict]) -> tuple[dict[str, float], int]:
  """The log window's metrics (means; the guard's counters at its last step) and the longest run of
  consecutive non-finite steps inside it."""
  host = jax.device_get(history)
  out = {k: float(host[-1][k] if k in COUNTER_METRICS else np.mean([h[k] for h in host])) for k in host[0]}
  return out, int(max(h["nonfinite_consecutive"] for h in host))


def on_process_0(fn: Callable[[], Any], what: str) -> Any:
  """Runs `fn` on process 0 only (the workdir lock and config record are one per job) and makes every
  process raise when it failed, so that no host is left waiting in a collective."""
  out, error = None, None
  if jax.process_index() == 0:
    try:
      out = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other processes know
      error = e
  if jax.process_count() > 1:
    ok = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not ok and error is None:
      raise RuntimeError(f"process 0 stopped the run while {what}; its log says why")
  if error is not None:
    raise error
  return out


def _lock_and_check(config: ml_collections.ConfigDict, workdir: str) -> workdir_lib.WorkdirLock:
  tc = config.train
  lock = workdir_lib.WorkdirLock(workdir, tc.lock_heartbeat_s, tc.lock_stale_s)
  lock.acquire()
  try:
    workdir_lib.check_config(config, workdir)
  except BaseException:
    lock.release()
    raise
  return lock


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config.train.num_steps` steps (resuming from `workdir` if it holds a checkpoint), validating and
  checkpointing on the configured cadence, while holding WORKDIR/lock. Returns the last validation metrics,
  'train' (the last logged train metrics) and 'step'; after a SIGTERM stop only 'train', 'step' and
  'preempted': True (the last validation would be of another step)."""
  lock = on_process_0(lambda: _lock_and_check(config, workdir), "locking the workdir")
  try:
    return _train(config, workdir)
  finally:
    if lock is not None:
      lock.release()


def _train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  d, tc = config.data, config.train
  data = open_data(config, workdir)
  train_split, val_split = data["train"], data["val"]
  eval_plan = source.eval_plan(val_split, d.eval_batch_size)

  exp = Experiment(config)
  ckpts = ckpt_lib.Checkpoints(workdir, tc.max_checkpoints)
  state = ckpts.restore(exp.abstract_state()) or exp.init_state()
  if jax.process_index() == 0:
    workdir_lib.record_config(config, workdir)
  start = int(jax.device_get(state.step))
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start == 0:
    writer.write_hparams({k: str(v) for k, v in config.to_dict().items() if not isinstance(v, dict)})

  shapes_seen: set[int] = set()
  history: list[dict] = []
  last_eval: dict[str, Any] = {}
  last_train: dict[str, float] = {}
  t_log, step_log = time.time(), start
  preempted = False
  try:
    read = functools.partial(source.train_host_batch, train_split, config)
    prefetcher = batching.Prefetcher(read, range(start, tc.num_steps), d.prefetch, d.prefetch_workers)
    with _Preemption(start) as preempt, prefetcher as batches:
      for step, batch in batches:
        shapes_seen.add(batch["features"].shape[1])
        state, m = exp.train_step(state, sharding.shard_batch(batch, exp.mesh))
        history.append(m)
        done = step + 1
        preempted = preempt.should_stop(done)
        if done % tc.log_every == 0 or done == tc.num_steps:
          scalars, run = _window_metrics(history)
          last_train = dict(scalars)
          history = []
          if run >= tc.max_nonfinite_steps:
            raise NonFiniteError(
                f"{run} consecutive non-finite training steps (NaN/Inf gradients) up to step {done} "
                f"(config.train.max_nonfinite_steps={tc.max_nonfinite_steps}); their updates were skipped and "
                "no non-finite state was saved. Lower optim.lr_peak, check the augmentation (aug.*) and the data, "
                "then rerun: training resumes from the last checkpoint")
          now = time.time()
          rate = (done - step_log) / max(now - t_log, 1e-9)
          t_log, step_log = now, done
          scalars["steps_per_sec"] = rate
          writer.write_scalars(done, scalars)
          eta = (tc.num_steps - done) / max(rate, 1e-9)
          logging.info("step %d/%d  loss %.3f  %.2f steps/s  ETA %dm%02ds  nonfinite_steps %d  (%d time shapes "
                       "compiled)", done, tc.num_steps, scalars["loss"], rate, eta // 60, eta % 60,
                       scalars["nonfinite_steps"], len(shapes_seen))
        if step % tc.eval_every == 0 or done == tc.num_steps:
          last_eval = evaluate(exp, state.params, val_split, eval_plan)
          writer.write_scalars(done, {k: v for k, v in last_eval.items() if k != "per_day"})
          logging.info("step %d  val PER %.4f  val loss %.3f  (%d infeasible)\n%s", done, last_eval["val_per"],
                       last_eval["val_loss"], last_eval["val_infeasible"],
                       format_per_day(last_eval["per_day"], d.sessions))
          ckpts.maybe_save_best(state, last_eval["val_per"], last_eval["val_loss"])
          t_log = time.time()  # evaluation time is not training time
        if done % tc.checkpoint_every == 0 or done == tc.num_steps or preempted:
          ckpts.save_latest(state, force=preempted)
        if preempted:
          logging.warning("stopped at step %d on SIGTERM; rerun the same command to resume", done)
          break
  finally:
    ckpts.wait()
    writer.flush()
  ckpts.close()
  step = int(jax.device_get(state.step))
  if preempted:
    return {"train": last_train, "step": step, "preempted": True}
  return {**last_eval, "train": last_train, "step": step, "preempted": False}


def restore_for_reading(exp: Experiment, workdir: str, which: str) -> TrainState:
  """The `which` ('best' or 'latest') checkpoint of `workdir`, else the latest, without writing to `workdir`
  (eval and infer take no lock and run on read-only workdirs); the config is first checked against the one
  that created the workdir."""
  workdir_lib.check_config(exp.config, workdir)
  ckpts = ckpt_lib.Checkpoints(workdir, read_only=True)
  try:
    state = ckpts.restore(exp.abstract_state(), which)
    if state is None and which != "latest":
      state = ckpts.restore(exp.abstract_state(), "latest")
  finally:
    ckpts.close()
  if state is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/best or {workdir}/checkpoints; train first (or import "
                            "a PyTorch checkpoint into this workdir)")
  return state


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, which: str = "best") -> dict[str, Any]:
  """Loads the best (else latest) checkpoint of `workdir` and evaluates the val split; writes metrics.json and
  skipped_trials.json to `config.eval.out_dir` (default WORKDIR/eval), nothing else."""
  out_dir = config.eval.out_dir or os.path.join(workdir, "eval")
  val_split = open_data(config, workdir, ("val",), report_dir=out_dir)["val"]
  exp = Experiment(config)
  state = restore_for_reading(exp, workdir, which)
  result = evaluate(exp, state.params, val_split, source.eval_plan(val_split, config.data.eval_batch_size))
  result["step"] = int(jax.device_get(state.step))
  if jax.process_index() == 0:
    workdir_lib.write_atomically(str(epath.Path(out_dir) / "metrics.json"),
                                 json.dumps({k: v for k, v in result.items() if k != "per_day"}, indent=1))
  return result
