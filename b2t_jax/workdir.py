"""What a workdir remembers about its runs: the config that created it and who is training in it now.

- WORKDIR/config.json: the flattened config of the run that created the workdir. A resume compares against it
  and stops on any difference outside `SAFE_TO_CHANGE` (fields that would change state shapes, the data stream
  or the meaning of the checkpointed state), naming every differing field with both values.
- WORKDIR/lock: the host, pid and heartbeat time of the training run that holds the workdir. A second run
  refuses to start; a lock whose process is gone (same host) or whose heartbeat stopped is taken over.
Only training writes either file; eval and infer only read config.json.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

import ml_collections
from absl import logging
from etils import epath

CONFIG_FILE = "config.json"
LOCK_FILE = "lock"

# Fields a resume may change (an entry ending in "." covers a whole section): launch topology and
# parallelism, data location and reading, implementation choices with the same math, the LR schedule (lowering
# it after a divergence is the usual fix), cadences and the eval/infer/decode settings. Every other field
# (model, sessions, features, batch recipe, seeds, augmentation, loss, optimizer structure) is fixed.
SAFE_TO_CHANGE = (
  "mode",
  "distributed",
  "coordinator_address",
  "num_processes",
  "process_id",
  "cpu_collectives",
  "mesh_shape",
  "logical_axis_rules",
  "fsdp",
  "fsdp_min_size",
  "reference_yaml",
  "data.data_dir",
  "data.cache_dir",
  "data.prefetch",
  "data.prefetch_workers",
  "data.loader",
  "data.grain_workers",
  "data.eval_batch_size",
  "data.on_bad_trial",
  "model.gru_unroll",
  "model.gru_backward",
  "model.gru_remat",
  "model.gru_wavefront",
  "optim.lr_peak",
  "optim.lr_min",
  "optim.warmup_steps",
  "optim.decay_steps",
  "optim.day_lr_peak",
  "optim.day_lr_min",
  "optim.day_warmup_steps",
  "train.",
  "eval.",
  "calibrate.",
  "infer.",
  "decode.",
  "stream.",
)
# Fields under a SAFE_TO_CHANGE section that change the checkpointed state's shapes all the same.
NEVER_SAFE = ("train.n_models",)
# Fields added after config.json existed, with the value every older workdir implicitly ran with (JSON values).
ADDED_LATER = {
  "train.n_models": 1,
  "data.length_aware": False,
  "data.length_window": 0.1,
  "model.encoder": "gru",
  "model.intermediate_ctc": [],
  "loss.intermediate_ctc_weight": 0.3,
  "model.targets": "phoneme",
  "loss.phoneme_ctc_weight": 0.3,  # compared only for diphone targets (TARGET_FIELDS)
  "loss.marginal_ctc_weight": 1.0,  # compared only for diphone targets (TARGET_FIELDS)
  "model.diphone_head": "flat",  # compared only for diphone targets (TARGET_FIELDS)
  "aug.time_jitter_shift_bins": 0,
  "aug.time_jitter_stretch": 0.0,
  "aug.time_mask_fraction": 0.0,
  "aug.time_mask_max_bins": 20,
  "decode.lexicon_variants": False,
  "decode.nbest": 1,
  "decode.rescore.kind": "none",
  "decode.rescore.path": "",
  "decode.rescore.weight": 1.0,
  "decode.rescore.word_bonus": 0.0,
  "decode.rescore.gate_margin": 0.0,
  "decode.rescore.batch_size": 16,
  "reference_yaml": "",
  "data.loader": "threads",
  "data.grain_workers": 2,
  "train.profile_steps": 0,
  "train.profile_python": False,
}
# Each encoder's sub-config: compared only when the run uses that encoder (model.encoder, itself compared).
ENCODER_SECTIONS = {"transformer": "model.transformer.", "mamba2": "model.mamba2."}
# Fields that shape only a diphone head: compared only when the run has one (model.targets, itself compared), so a
# phoneme workdir from before them resumes under their new defaults.
TARGET_FIELDS = ("model.diphone_head", "loss.marginal_ctc_weight", "loss.phoneme_ctc_weight")
_ABSENT = "<absent>"


class ConfigMismatch(ValueError):
  """A resume whose config differs from the one that created the workdir in a field that must not change."""


class WorkdirLocked(RuntimeError):
  """Another live run holds the workdir."""


def _is_local(path: str) -> bool:
  return "://" not in path


def write_atomically(path: str, text: str) -> None:
  """Readers see the old or the new file, never a half-written one (local: rename; GCS objects are atomic)."""
  if not _is_local(path):
    epath.Path(path).write_text(text)
    return
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{'section.field': value} with JSON values (tuples become lists), as stored in config.json."""
  out: dict[str, Any] = {}

  def walk(node: dict, prefix: str) -> None:
    for k, v in node.items():
      if isinstance(v, dict):
        walk(v, f"{prefix}{k}.")
      else:
        out[f"{prefix}{k}"] = v

  walk(config.to_dict(), "")
  return json.loads(json.dumps(out))


def is_safe_to_change(field: str) -> bool:
  if field in NEVER_SAFE:
    return False
  return any(field.startswith(s) if s.endswith(".") else field == s for s in SAFE_TO_CHANGE)


def _unused_field(field: str, current: dict[str, Any]) -> bool:
  """A field the current run's model does not read: another encoder's sub-config, a diphone field of phonemes."""
  encoder = current.get("model.encoder", ADDED_LATER["model.encoder"])
  if any(field.startswith(prefix) for name, prefix in ENCODER_SECTIONS.items() if name != encoder):
    return True
  return field in TARGET_FIELDS and current.get("model.targets", ADDED_LATER["model.targets"]) == "phoneme"


def config_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """'field: recorded -> current' for every field that differs and may not change on resume (fields the run's
  model does not read, such as the sub-configs of other encoders, are not compared)."""
  recorded = {**ADDED_LATER, **recorded}
  return [
    f"{k}: {recorded.get(k, _ABSENT)!r} (workdir) -> {current.get(k, _ABSENT)!r} (now)"
    for k in sorted(set(recorded) | set(current))
    if not is_safe_to_change(k)
    and not _unused_field(k, current)
    and recorded.get(k, _ABSENT) != current.get(k, _ABSENT)
  ]


def check_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Compares `config` with WORKDIR/config.json (when there is one); raises `ConfigMismatch` naming every
  field that differs and may not change on resume, with both values."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return
  diff = config_differences(json.loads(path.read_text()), flat_config(config))
  if diff:
    raise ConfigMismatch(
      f"{workdir} was created by another config ({path}); these fields cannot change on resume:\n  "
      + "\n  ".join(diff)
      + "\nResume with the recorded values, or train in a new --workdir (the fields that "
      "may change are listed in the README, 'Failure modes')"
    )


def record_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes WORKDIR/config.json unless it exists (a new workdir, or one from before this file existed); called
  once the train state is known to belong to `config` (restored or freshly initialised)."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    write_atomically(str(path), json.dumps(flat_config(config), indent=1, sort_keys=True))
    logging.info("recorded the config of this workdir in %s", path)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


class WorkdirLock:
  """WORKDIR/lock while a training run holds the workdir; a daemon thread refreshes its heartbeat."""

  def __init__(self, workdir: str, heartbeat_s: float, stale_s: float):
    self.path = str(epath.Path(workdir) / LOCK_FILE)
    self.workdir = workdir
    self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
    self.info = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex, "started": time.time()}
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _text(self) -> str:
    return json.dumps({**self.info, "heartbeat": time.time()})

  def _create(self) -> bool:
    """Creates the lock file with our content unless it exists; True when we hold it."""
    if not _is_local(self.path):  # no exclusive create on object stores: write, then check we won
      p = epath.Path(self.path)
      if p.exists():
        return False
      p.write_text(self._text())
      return (self._read() or {}).get("token") == self.info["token"]
    tmp = f"{self.path}.tmp-{self.info['token'][:8]}"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(self._text())
    try:
      os.link(tmp, self.path)  # atomic, fails if the lock exists: the file appears with its content
      return True
    except FileExistsError:
      return False
    finally:
      os.remove(tmp)

  def _read(self) -> dict | None:
    try:
      return json.loads(epath.Path(self.path).read_text())
    except (FileNotFoundError, ValueError):
      return None

  def _stale_reason(self, held: dict) -> str | None:
    age = time.time() - float(held.get("heartbeat", 0.0))
    if held.get("host") == self.info["host"] and (held.get("pid") == self.info["pid"] or not _alive(held["pid"])):
      return "its process is gone"
    if age > self.stale_s:
      return f"no heartbeat for {age:.0f} s (config.train.lock_stale_s={self.stale_s})"
    return None

  def acquire(self) -> None:
    """Takes the lock, or raises `WorkdirLocked` naming the holder."""
    epath.Path(self.workdir).mkdir(parents=True, exist_ok=True)
    for _ in range(3):
      if self._create():
        break
      held = self._read()
      if held is None:  # removed between our attempt and the read: try again
        continue
      reason = self._stale_reason(held)
      if reason is None:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(held.get("started", 0))))
        raise WorkdirLocked(
          f"workdir {self.workdir} is locked by host {held.get('host')} pid {held.get('pid')} (training since "
          f"{since}, heartbeat {time.time() - float(held.get('heartbeat', 0)):.0f} s ago): another run is using "
          f"it. Wait for that run or stop it, or use another --workdir; if it is dead, delete {self.path}"
        )
      logging.warning(
        "taking over the stale lock %s of host %s pid %s: %s", self.path, held.get("host"), held.get("pid"), reason
      )
      epath.Path(self.path).unlink(missing_ok=True)
    else:
      raise WorkdirLocked(f"could not take the lock {self.path}: other runs keep creating it")
    self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      if (self._read() or {}).get("token") != self.info["token"]:
        logging.error("the workdir lock %s was taken over by another run; stop one of them", self.path)
        return
      write_atomically(self.path, self._text())

  def release(self) -> None:
    """Stops the heartbeat and removes the lock if it is still ours."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
      if (self._read() or {}).get("token") == self.info["token"]:
        epath.Path(self.path).unlink(missing_ok=True)


def config_source(config: ml_collections.ConfigDict, base: ml_collections.ConfigDict, doc: str) -> str:
  """The text of a config file that rebuilds `config`: configs/default.py (whose `get_config()` is `base`) plus
  one assignment per field that differs from it, with `doc` as the module docstring."""
  lines = [f'"""{doc}"""', "", "from configs import default", "", "", "def get_config():", "  c = default.get_config()"]

  def walk(node: ml_collections.ConfigDict, ref: ml_collections.ConfigDict | None, prefix: str) -> None:
    for key, value in node.items():
      known = ref is not None and key in ref
      if isinstance(value, ml_collections.ConfigDict):
        if not known:
          lines.append(f"  {prefix}{key} = ml_collections.ConfigDict()")
        walk(value, ref[key] if known else None, f"{prefix}{key}.")
      elif not known or ref[key] != value:
        lines.append(f"  {prefix}{key} = {value!r}")

  walk(config, base, "c.")
  if any("ml_collections.ConfigDict()" in line for line in lines):
    lines.insert(2, "import ml_collections")
  return "\n".join([*lines, "  return c"]) + "\n"


def recorded_config(workdir: str, overrides: dict[str, Any] | None = None) -> ml_collections.FrozenConfigDict:
  """The config recorded in WORKDIR/config.json, built on top of configs/default.py (JSON lists become tuples
  where the default holds a tuple; fields added since take their defaults), with `overrides` ({'section.field':
  value}, e.g. this machine's launch settings) applied while it is built. Returned frozen: nothing writes to it."""
  from configs import default  # the installed configs package

  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: {workdir} is not a b2t_jax training workdir")
  config = default.get_config()
  for key, value in {**json.loads(path.read_text()), **(overrides or {})}.items():
    *sections, field = key.split(".")
    node = config
    for section in sections:
      node = node[section]
    if isinstance(node.get(field), tuple) and isinstance(value, list):
      value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    node[field] = value
  return ml_collections.FrozenConfigDict(config)


def with_overrides(
  config: ml_collections.ConfigDict | ml_collections.FrozenConfigDict, overrides: dict[str, Any]
) -> ml_collections.FrozenConfigDict:
  """A new, frozen config: `config` with `overrides` ({'section.field': value}); `config` is not written to."""
  if isinstance(config, ml_collections.FrozenConfigDict):
    out = config.as_configdict()
  else:
    out = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    *sections, field = key.split(".")
    node = out
    for section in sections:
      node = node[section]
    node[field] = value
  return ml_collections.FrozenConfigDict(out)
