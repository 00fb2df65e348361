"""The training loop: data -> jitted train step over the mesh -> metrics, evaluation and checkpoints."""

from __future__ import annotations

import contextlib
import functools
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from jax.experimental import multihost_utils

from b2t_jax import checkpoint as ckpt_lib
from b2t_jax import sharding
from b2t_jax import workdir as workdir_lib
from b2t_jax.data import batching, grain_loader, pipeline
from b2t_jax.evaluation import evaluate, format_per_day
from b2t_jax.experiment import Experiment, open_data
from b2t_jax.steps import COUNTER_METRICS, NonFiniteError


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
      except RuntimeError as e:  # jax_enable_preemption_service=False
        logging.warning("JAX's preemption service is off (%s): SIGTERM stops only the process that gets it", e)

  def __enter__(self):
    if self._synced:  # a Python handler would take SIGTERM away from the sync manager
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


PROFILE_WARMUP = 2  # steps of a run never traced: the first compiles the step, the second shows its dispatch settle


class _Profile:
  """config.train.profile_steps > 0: a trace of that many steps, from the run's step start + PROFILE_WARMUP on,
  written by jax.profiler to WORKDIR/plugins/profile/<run>/ (TensorBoard's Profile tab and XProf read it there,
  beside the metrics). Process 0 only: several processes on one host would write the same file name.

  Python function calls are traced only with `python=True` (config.train.profile_python): XLA's Python tracer
  walks every thread's state to install and to remove itself, and on Python 3.11 that can crash the process
  (SIGSEGV) when a thread that is not Python's (tensorstore's under orbax, for one) enters Python at that moment
  (tests/test_train.py::test_profiling_survives_native_threads_entering_python)."""

  def __init__(self, workdir: str, start: int, n_steps: int, python: bool = False):
    self.workdir, self.first, self.stop = workdir, start + PROFILE_WARMUP, start + PROFILE_WARMUP + n_steps
    self.enabled = n_steps > 0 and jax.process_index() == 0
    self.active = False
    self.options = jax.profiler.ProfileOptions()
    self.options.python_tracer_level = int(python)

  def before(self, step: int) -> None:
    if self.enabled and step == self.first:
      logging.info("profiling steps %d..%d into %s/plugins/profile", self.first + 1, self.stop, self.workdir)
      if self.options.python_tracer_level:
        logging.warning("train.profile_python: XLA's Python tracer can crash this process (SIGSEGV); see _Profile")
      jax.profiler.start_trace(self.workdir, profiler_options=self.options)
      self.active = True

  def annotation(self, step: int):
    """Marks the step in the trace (XProf's step view) while tracing."""
    return jax.profiler.StepTraceAnnotation("train", step_num=step) if self.active else contextlib.nullcontext()

  def after(self, step: int, outputs: Any) -> None:
    if self.active and step + 1 >= self.stop:
      self.end(outputs)

  def end(self, outputs: Any = None) -> None:
    if self.active:
      jax.block_until_ready(outputs)  # the traced steps' device work belongs in the trace
      jax.profiler.stop_trace()
      self.active = False
      logging.info("profile written to %s/plugins/profile", self.workdir)


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
  eval_plan = pipeline.eval_plan(val_split, d.eval_batch_size)

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
  real_bins = padded_bins = 0  # this process's rows in the log window: trial bins, and bins after padding
  preempted = False
  profile = _Profile(workdir, start, tc.profile_steps, tc.profile_python)
  loader = None
  try:
    if d.loader == "grain":  # the same batches, built by Grain transforms in worker processes
      loader = grain_loader.TrainBatches(train_split, config, start, tc.num_steps)
    else:
      read = functools.partial(pipeline.train_host_batch, train_split, config)
      loader = batching.Prefetcher(read, range(start, tc.num_steps), d.prefetch, d.prefetch_workers)
    with _Preemption(start) as preempt:
      for step, batch in loader:
        shapes_seen.add(batch["features"].shape[1])
        real_bins += int(batch["n_time_steps"].sum())
        padded_bins += batch["features"].shape[0] * batch["features"].shape[1]
        profile.before(step)
        with profile.annotation(step):
          state, m = exp.train_step(state, sharding.shard_batch(batch, exp.mesh))
        profile.after(step, m)
        history.append(m)
        done = step + 1
        preempted = preempt.should_stop(done)
        if done % tc.log_every == 0 or done == tc.num_steps:
          scalars, run = _window_metrics(history)
          history = []
          if run >= tc.max_nonfinite_steps:
            raise NonFiniteError(
              f"{run} consecutive non-finite training steps (NaN/Inf gradients) up to step {done} "
              f"(config.train.max_nonfinite_steps={tc.max_nonfinite_steps}); their updates were skipped and "
              "no non-finite state was saved. Lower optim.lr_peak, check the augmentation (aug.*) and the data, "
              "then rerun: training resumes from the last checkpoint"
            )
          now = time.time()
          elapsed = max(now - t_log, 1e-9)
          rate = (done - step_log) / elapsed
          t_log, step_log = now, done
          scalars["steps_per_sec"] = rate
          # Host-side counts (no device sync); every process reads an equal share of each global batch.
          scalars["real_bins_per_sec"] = real_bins * jax.process_count() / elapsed
          scalars["pad_waste"] = 1.0 - real_bins / max(padded_bins, 1)
          real_bins = padded_bins = 0
          last_train = dict(scalars)
          writer.write_scalars(done, scalars)
          eta = (tc.num_steps - done) / max(rate, 1e-9)
          logging.info(
            "step %d/%d  loss %.3f  %.2f steps/s  %.0f trial bins/s  padding %.0f%%  ETA %dm%02ds  nonfinite_steps %d  "
            "(%d time shapes compiled)",
            done,
            tc.num_steps,
            scalars["loss"],
            rate,
            scalars["real_bins_per_sec"],
            100 * scalars["pad_waste"],
            eta // 60,
            eta % 60,
            scalars["nonfinite_steps"],
            len(shapes_seen),
          )
        if step % tc.eval_every == 0 or done == tc.num_steps:
          last_eval = evaluate(exp, state.params, val_split, eval_plan)
          writer.write_scalars(done, {k: v for k, v in last_eval.items() if k != "per_day"})
          members = [last_eval[f"val_per_member_{k}"] for k in range(exp.n_models)] if exp.n_models > 1 else []
          logging.info(
            "step %d  val PER %.4f%s  val loss %.3f  (%d infeasible)\n%s",
            done,
            last_eval["val_per"],
            f" (ensemble; members {' '.join(f'{p:.4f}' for p in members)})" if members else "",
            last_eval["val_loss"],
            last_eval["val_infeasible"],
            format_per_day(last_eval["per_day"], d.sessions),
          )
          ckpts.maybe_save_best(state, last_eval["val_per"], last_eval["val_loss"])
          t_log = time.time()  # evaluation time is not training time
        if done % tc.checkpoint_every == 0 or done == tc.num_steps or preempted:
          ckpts.save_latest(state, force=preempted)
        if preempted:
          logging.warning("stopped at step %d on SIGTERM; rerun the same command to resume", done)
          break
  finally:
    try:
      profile.end()  # a run shorter than the window, or an error: stop the trace here
      ckpts.wait()
    finally:
      if loader is not None:  # after the saves: no checkpoint is being written while Grain's workers are torn down
        loader.close()
      writer.flush()
  ckpts.close()
  step = int(jax.device_get(state.step))
  if preempted:
    return {"train": last_train, "step": step, "preempted": True}
  return {**last_eval, "train": last_train, "step": step, "preempted": False}
