"""Evaluating a split (aggregate and per-day PER, CTC loss), the per-day table, and restoring a workdir's
checkpoint for reading (best, else latest): shared by the training loop, mode=eval, mode=infer and the tools."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from b2t_jax import checkpoint as ckpt_lib
from b2t_jax import metrics as metrics_lib
from b2t_jax import sharding
from b2t_jax import workdir as workdir_lib
from b2t_jax.data import batching, pipeline
from b2t_jax.experiment import Experiment, open_data
from b2t_jax.steps import TrainState


def eval_batches(
  exp: Experiment, split: pipeline.DataSplit, plan: list[np.ndarray]
) -> Iterator[tuple[np.ndarray, dict[str, jax.Array]]]:
  """(global record indices, global device batch) of each eval batch of `plan`, read ahead by the prefetcher;
  each process reads only its rows."""
  config = exp.config
  read = functools.partial(pipeline.eval_host_batch, split, config)
  with batching.Prefetcher(read, plan, config.data.prefetch, config.data.prefetch_workers) as batches:
    for idx, batch in batches:
      yield idx, sharding.shard_batch(batch, exp.mesh)


def evaluate(exp: Experiment, params: Any, split: pipeline.DataSplit, plan: list[np.ndarray]) -> dict[str, Any]:
  """Runs every trial of `plan` (global record indices per eval batch) once; each process reads only its
  rows. Returns aggregate and per-day PER, mean CTC loss and the infeasible count (of an ensemble: of its merged
  log-probabilities, and `val_per_member_<k>` of each member)."""
  per = metrics_lib.ErrorRate()
  member_per = [metrics_lib.ErrorRate() for _ in range(exp.n_models if exp.n_models > 1 else 0)]
  total_nll, n_feasible, n_infeasible = 0.0, 0, 0
  for _, gb in eval_batches(exp, split, plan):
    out = sharding.to_host(
      {
        **exp.eval_step(params, gb),
        "labels": gb["labels"],
        "label_lens": gb["label_lens"],
        "day": gb["day"],
        "weight": gb["weight"],
      }
    )
    for r in np.flatnonzero(out["weight"] > 0):
      n_in, day, ref = int(out["input_lens"][r]), int(out["day"][r]), out["labels"][r, : out["label_lens"][r]].tolist()
      per.add(day, metrics_lib.greedy_decode(out["pred"][r], n_in), ref)
      for k, member in enumerate(member_per):
        member.add(day, metrics_lib.greedy_decode(out["member_pred"][r, k], n_in), ref)
      if out["feasible"][r]:
        total_nll += float(out["nll"][r])
        n_feasible += 1
      else:
        n_infeasible += 1
  out = {
    "val_per": per.rate(),
    "val_loss": total_nll / max(n_feasible, 1),
    "val_infeasible": n_infeasible,
    "per_day": per.per_day(),
  }
  # An ensemble: val_per and val_loss are the merged log-probabilities'; each member's PER beside them.
  out.update({f"val_per_member_{k}": m.rate() for k, m in enumerate(member_per)})
  return out


def format_per_day(per_day: dict[int, float], sessions) -> str:
  """One line per day: session, day index and PER."""
  return "\n".join(f"  {sessions[d]:<16} day {d:>2}  PER {p:.4f}" for d, p in per_day.items())


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
    raise FileNotFoundError(
      f"no checkpoint in {workdir}/best or {workdir}/checkpoints; train first (or import "
      "a PyTorch checkpoint into this workdir)"
    )
  return state


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, which: str = "best") -> dict[str, Any]:
  """Loads the best (else latest) checkpoint of `workdir` and evaluates the val split; writes metrics.json and
  skipped_trials.json to `config.eval.out_dir` (default WORKDIR/eval), nothing else."""
  out_dir = config.eval.out_dir or os.path.join(workdir, "eval")
  val_split = open_data(config, workdir, ("val",), report_dir=out_dir)["val"]
  exp = Experiment(config)
  state = restore_for_reading(exp, workdir, which)
  result = evaluate(exp, state.params, val_split, pipeline.eval_plan(val_split, config.data.eval_batch_size))
  result["step"] = int(jax.device_get(state.step))
  if jax.process_index() == 0:
    workdir_lib.write_atomically(
      str(epath.Path(out_dir) / "metrics.json"),
      json.dumps({k: v for k, v in result.items() if k != "per_day"}, indent=1),
    )
  return result
