"""The training loop: data -> jitted train step over the mesh -> metrics, evaluation and checkpoints."""

from __future__ import annotations

import functools
import signal
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers

from b2t_jax import checkpoint as ckpt_lib
from b2t_jax import metrics as metrics_lib
from b2t_jax import sharding
from b2t_jax.data import batching, source, t15
from b2t_jax.models import create_model
from b2t_jax.optim import create_optimizer
from b2t_jax.steps import TrainState, create_train_state, eval_step, train_step
from b2t_jax.summary import abstract_params


class Experiment:
  """Model, optimizer, mesh and the jitted steps of one config; shared by train, eval and tests."""

  def __init__(self, config: ml_collections.ConfigDict, mesh=None):
    self.config = config
    self.model = create_model(config)
    self.tx = create_optimizer(config.optim)
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


def open_data(config: ml_collections.ConfigDict, workdir: str, splits=("train", "val")
              ) -> dict[str, source.DataSplit]:
  """Resolves (and if needed prepares) the dataset, opens `splits` with their load-time checks, checks the
  time buckets and writes the skip counts to WORKDIR/skipped_trials.json."""
  d = config.data
  dataset_dir = source.resolve_dataset(config, workdir)
  config.data.data_dir = dataset_dir
  out = {name: source.open_split(dataset_dir, config, name, train=name == "train") for name in splits}
  for split in out.values():
    if not len(split):
      raise t15.DataError(f"{dataset_dir}: the {split.name} split has no trials left")
    source.check_buckets(split, d.time_buckets)
  source.write_skips(workdir, list(out.values()))
  logging.info("data: %s from %s", ", ".join(f"{len(s)} {s.name}" for s in out.values()), dataset_dir)
  return out


def format_per_day(per_day: dict[int, float], sessions) -> str:
  return "\n".join(f"  {sessions[d]:<16} day {d:>2}  PER {p:.4f}" for d, p in per_day.items())


class _Preemption:
  """Turns SIGTERM (a preempted TPU VM, a cluster scheduler) into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: leave signals alone
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping after this step")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _mean_metrics(history: list[dict]) -> dict[str, float]:
  host = jax.device_get(history)
  return {k: float(np.mean([h[k] for h in host])) for k in host[0]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config.train.num_steps` steps (resuming from `workdir` if it holds a checkpoint), validating and
  checkpointing on the configured cadence. Returns the last validation metrics, plus 'train' (the last
  logged train metrics) and 'step'."""
  d, tc = config.data, config.train
  data = open_data(config, workdir)
  train_split, val_split = data["train"], data["val"]
  eval_plan = source.eval_plan(val_split, d.eval_batch_size)

  exp = Experiment(config)
  ckpts = ckpt_lib.Checkpoints(workdir, tc.max_checkpoints)
  state = ckpts.restore(exp.abstract_state()) or exp.init_state()
  start = int(jax.device_get(state.step))
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start == 0:
    writer.write_hparams({k: str(v) for k, v in config.to_dict().items() if not isinstance(v, dict)})

  shapes_seen: set[int] = set()
  history: list[dict] = []
  last_eval: dict[str, Any] = {}
  last_train: dict[str, float] = {}
  t_log, step_log = time.time(), start
  try:
    read = functools.partial(source.train_host_batch, train_split, config)
    prefetcher = batching.Prefetcher(read, range(start, tc.num_steps), d.prefetch, d.prefetch_workers)
    with _Preemption() as preempt, prefetcher as batches:
      for step, batch in batches:
        shapes_seen.add(batch["features"].shape[1])
        state, m = exp.train_step(state, sharding.shard_batch(batch, exp.mesh))
        history.append(m)
        done = step + 1
        if done % tc.log_every == 0 or done == tc.num_steps:
          scalars = last_train = _mean_metrics(history)
          history = []
          now = time.time()
          rate = (done - step_log) / max(now - t_log, 1e-9)
          t_log, step_log = now, done
          scalars["steps_per_sec"] = rate
          writer.write_scalars(done, scalars)
          eta = (tc.num_steps - done) / max(rate, 1e-9)
          logging.info("step %d/%d  loss %.3f  %.2f steps/s  ETA %dm%02ds  (%d time shapes compiled)", done,
                       tc.num_steps, scalars["loss"], rate, eta // 60, eta % 60, len(shapes_seen))
        if step % tc.eval_every == 0 or done == tc.num_steps:
          last_eval = evaluate(exp, state.params, val_split, eval_plan)
          writer.write_scalars(done, {k: v for k, v in last_eval.items() if k != "per_day"})
          logging.info("step %d  val PER %.4f  val loss %.3f  (%d infeasible)\n%s", done, last_eval["val_per"],
                       last_eval["val_loss"], last_eval["val_infeasible"],
                       format_per_day(last_eval["per_day"], d.sessions))
          ckpts.maybe_save_best(state, last_eval["val_per"], last_eval["val_loss"])
          t_log = time.time()  # evaluation time is not training time
        if done % tc.checkpoint_every == 0 or done == tc.num_steps or preempt.requested:
          ckpts.save_latest(state, force=preempt.requested)
        if preempt.requested:
          logging.warning("stopped at step %d on SIGTERM; rerun the same command to resume", done)
          break
  finally:
    ckpts.wait()
    writer.flush()
  ckpts.close()
  return {**last_eval, "train": last_train, "step": int(jax.device_get(state.step))}


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, which: str = "best") -> dict[str, Any]:
  """Loads the best (else latest) checkpoint of `workdir` and evaluates the val split."""
  val_split = open_data(config, workdir, ("val",))["val"]
  exp = Experiment(config)
  ckpts = ckpt_lib.Checkpoints(workdir)
  state = ckpts.restore(exp.abstract_state(), which) or ckpts.restore(exp.abstract_state(), "latest")
  if state is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/best or {workdir}/checkpoints; train first")
  result = evaluate(exp, state.params, val_split, source.eval_plan(val_split, config.data.eval_batch_size))
  result["step"] = int(jax.device_get(state.step))
  ckpts.close()
  return result
