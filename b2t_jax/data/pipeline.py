"""The runtime data layer training reads through: one split of a prepared TFDS (ArrayRecord) dataset opened
for random access, its load-time checks and skip counts, and each process's rows of a global batch.

Only the per-trial index (day, lengths, label lengths) lives in memory; features are read on demand, so
each process reads only its own rows of a global batch. prepare.py finds or builds the dataset folder.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import uuid
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from b2t_jax.data import batching, sampler, t15
from b2t_jax.patching import n_patches

SKIPS_FILE = "skipped_trials.json"  # written to the workdir: skip counts per split, stage and reason


@dataclasses.dataclass
class DataSplit:
  """One split of a prepared dataset: the in-memory index plus a random-access source of the examples."""

  name: str
  dataset_dir: str  # the prepared dataset folder it was opened from
  source: Any  # tfds ArrayRecordDataSource: len, __getitems__
  day: np.ndarray  # (N,) per record
  n_time_steps: np.ndarray
  label_len: np.ndarray
  ctc_len: np.ndarray
  index_in_file: np.ndarray
  sessions: tuple
  feature_pool: int
  keep: np.ndarray  # (N,) bool: passed the load-time checks
  skipped: dict  # {'prepare': {reason: n}, 'load': {reason: n}}

  def __len__(self) -> int:
    return int(self.keep.sum())

  def describe(self, i: int) -> str:
    return f"{self.sessions[self.day[i]]} trial_{self.index_in_file[i]:04d} ({self.name} record {i})"

  @functools.cached_property
  def days(self) -> dict[int, np.ndarray]:
    """`day_indices()`, computed once (the sampler asks every step; `keep` is final after open_split)."""
    return self.day_indices()

  def day_indices(self) -> dict[int, np.ndarray]:
    """day -> record indices of that day's kept trials (ascending)."""
    idx = np.flatnonzero(self.keep)
    return {int(d): idx[self.day[idx] == d] for d in np.unique(self.day[idx])}

  def read(self, indices: Sequence[int]) -> list[t15.Trial]:
    """Reads and decodes the given records (features pooled as configured)."""
    indices = [int(i) for i in indices]
    if not indices:
      return []
    examples = self.source.__getitems__(indices)
    out = []
    for i, ex in zip(indices, examples):
      if int(ex["day"]) != self.day[i] or int(ex["n_time_steps"]) != self.n_time_steps[i]:
        raise t15.DataError(
          f"{self.describe(i)}: the record disagrees with the dataset index; the prepared "
          "dataset is inconsistent: delete it and prepare it again"
        )
      labelled = self.name != "test"
      out.append(
        t15.Trial(
          batching.pool_features(np.asarray(ex["features"], np.float32), self.feature_pool),
          np.asarray(ex["phonemes"], np.int32) if labelled else None,
          _text(ex["sentence"]) if labelled else None,
          int(ex["day"]),
          _text(ex["session"]),
          int(ex["block"]),
          int(ex["trial"]),
          int(ex["index_in_file"]),
          _text(ex["transcription"]) if labelled else None,
        )
      )
    return out


def split_sentences(dataset_dir: str, split: str):
  """The sentence of every record of one split of a prepared dataset, in record order."""
  import tensorflow_datasets as tfds

  builder = tfds.builder_from_directory(dataset_dir)
  if split not in builder.info.splits:
    raise t15.DataError(f"{dataset_dir} has no {split} split")
  records = builder.as_data_source(split)
  for i in range(len(records)):
    yield _text(records[i]["sentence"])


def split_transcripts(dataset_dir: str, split: str):
  """(trial, sentence, phoneme ids) of every record of one labelled split of a prepared dataset, in record order
  (the records hold the features, so this reads them too)."""
  import tensorflow_datasets as tfds

  builder = tfds.builder_from_directory(dataset_dir)
  if split not in builder.info.splits:
    raise t15.DataError(f"{dataset_dir} has no {split} split")
  records = builder.as_data_source(split)
  for i in range(len(records)):
    r = records[i]
    where = f"{_text(r['session'])}/{t15.TRIAL_FMT.format(int(r['index_in_file']))}"
    yield where, _text(r["sentence"]), np.asarray(r["phonemes"], np.int32)


def _text(v) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _check_metadata(meta: dict, config: ml_collections.ConfigDict, dataset_dir: str) -> None:
  d = config.data
  built = list(meta.get("sessions", []))
  if built != list(d.sessions)[: len(built)] or not built:
    raise t15.DataError(
      f"{dataset_dir} was prepared with a different session list than config.data.sessions "
      "(the day index is the position in that list); prepare it again with this config's list"
    )
  if meta.get("n_features") != d.n_features:
    raise t15.DataError(
      f"{dataset_dir} holds {meta.get('n_features')} features per bin but config.data.n_features={d.n_features}"
    )


def open_split(dataset_dir: str, config: ml_collections.ConfigDict, split: str, *, train: bool) -> DataSplit:
  """Opens one split for random access and applies the load-time checks of `config`.

  Checks (each an error naming the trial, or with on_bad_trial='skip' a counted skip): labels longer than
  config.data.max_label_len; labels that cannot fit the CTC frames of the patched trial. `train` is kept for
  checks that differ between training and evaluation (none today)."""
  import tensorflow_datasets as tfds  # heavy import: only where a dataset is opened

  d = config.data
  builder = tfds.builder_from_directory(dataset_dir)
  meta = dict(builder.info.metadata or {})
  _check_metadata(meta, config, dataset_dir)
  if split not in builder.info.splits:
    raise t15.DataError(f"{dataset_dir} has no {split} split (no session file for it had a valid trial)")
  index = meta["index"][split]
  arrays = {k: np.asarray(v, np.int64) for k, v in index.items()}
  source = builder.as_data_source(split)
  if len(source) != len(arrays["day"]):
    raise t15.DataError(
      f"{dataset_dir}: the {split} split has {len(source)} records but its index "
      f"{len(arrays['day'])}; delete the folder and prepare it again"
    )
  out = DataSplit(
    split,
    dataset_dir,
    source,
    arrays["day"],
    arrays["n_time_steps"],
    arrays["label_len"],
    arrays["ctc_len"],
    arrays["index_in_file"],
    tuple(meta["sessions"]),
    d.feature_pool,
    np.ones(len(source), bool),
    {"prepare": dict(meta.get("skipped", {}).get(split, {})), "load": {}},
  )
  _apply_load_checks(out, config, train=train)
  return out


def _apply_load_checks(s: DataSplit, config: ml_collections.ConfigDict, *, train: bool) -> None:
  d, m = config.data, config.model
  # Uncut length: a trial that fits only without the random cut stays in, and the steps whose cut makes it
  # infeasible mask it out of the CTC mean and count it (losses.feasible_mask), as SPEC §4 asks.
  frames = n_patches(s.n_time_steps, m.patch_size, m.patch_stride)
  problems = {
    "label_too_long": (
      s.label_len > d.max_label_len,
      lambda i: f"{s.label_len[i]} phonemes exceed config.data.max_label_len={d.max_label_len}; raise it",
    ),
    "too_short_for_labels": (
      (frames < np.maximum(s.ctc_len, 1)) & (s.label_len <= d.max_label_len),
      lambda i: (
        f"{s.n_time_steps[i]} bins give {max(int(frames[i]), 0)} CTC frames after "
        f"patching (size {m.patch_size}, stride {m.patch_stride}), but its "
        f"{s.label_len[i]} labels need {s.ctc_len[i]}"
      ),
    ),
  }
  counts = collections.Counter()
  for reason, (mask, explain) in problems.items():
    bad = np.flatnonzero(mask & s.keep)
    if not len(bad):
      continue
    msg = f"{s.describe(bad[0])}: {explain(bad[0])}"
    if d.on_bad_trial == "error":
      raise t15.DataError(
        f"{msg} ({len(bad)} such trial(s) in the {s.name} split); set "
        "config.data.on_bad_trial='skip' to leave them out (counted)",
        reason,
      )
    logging.warning("skipping %d %s trial(s) (%s), e.g. %s", len(bad), s.name, reason, msg)
    s.keep[bad] = False
    counts[reason] += len(bad)
  s.skipped["load"] = dict(counts)


def write_skips(workdir: str, splits: Sequence[DataSplit]) -> str:
  """Writes WORKDIR/skipped_trials.json: {split: {'prepare': {reason: n}, 'load': {reason: n}, 'kept': n}}."""
  path = epath.Path(workdir) / SKIPS_FILE
  report = {
    s.name: {
      **s.skipped,
      "kept": len(s),
      "reasons": {r: t15.REASONS[r] for st in s.skipped.values() for r in st if r in t15.REASONS},
    }
    for s in splits
  }
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = {}  # eval mode rewrites only 'val'
    try:
      previous = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError as e:
      logging.warning("%s is not valid JSON (%s); writing it afresh", path, e)
    # A temporary file then a rename: a crash or a full disk mid-write leaves the old file whole (os.replace on a
    # local disk; on gs:// the rename is a copy, and an object is never visible half-written anyway).
    tmp = path.parent / f".{SKIPS_FILE}.tmp-{uuid.uuid4().hex[:8]}"
    try:
      tmp.write_text(json.dumps({**previous, **report}, indent=2, sort_keys=True))
      tmp.replace(path)
    except BaseException:
      tmp.unlink(missing_ok=True)
      raise
  total = {s.name: sum(sum(v.values()) for v in s.skipped.values()) for s in splits}
  if any(total.values()):
    logging.warning("skipped trials per split: %s (details in %s)", total, path)
  return str(path)


def check_buckets(s: DataSplit, buckets: Sequence[int]) -> None:
  """Fails early, naming the trial, when a kept trial is longer than every bucket."""
  kept = np.flatnonzero(s.keep)
  longest = kept[np.argmax(s.n_time_steps[kept])]
  if s.n_time_steps[longest] > max(buckets):
    raise ValueError(
      f"{s.describe(longest)} has {s.n_time_steps[longest]} bins, more than the largest of "
      f"config.data.time_buckets={tuple(buckets)}; add a bucket"
    )


def rows_per_process(n_rows: int, process_count: int, field: str) -> int:
  """Rows of a global batch each process reads; an error naming the config field when they do not divide."""
  if n_rows % process_count:
    raise ValueError(
      f"config.data.{field}={n_rows} does not divide the {process_count} processes: every process "
      f"reads an equal share of each batch; make it a multiple of {process_count}"
    )
  return n_rows // process_count


def _host_rows(
  s: DataSplit,
  config: ml_collections.ConfigDict,
  idx: np.ndarray,
  n_rows: int,
  field: str,
  process_index: int | None,
  process_count: int | None,
) -> dict[str, np.ndarray]:
  """This process's share of the global batch of record indices `idx` (padded to `n_rows` rows in all). The
  time bucket comes from the global batch's lengths (the index), so every process pads to the same shape."""
  d = config.data
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  t = batching.bucket_length(int(s.n_time_steps[idx].max()), d.time_buckets)
  rows = rows_per_process(n_rows, pc, field)
  mine = idx[pi * rows : (pi + 1) * rows]
  return batching.pad_batch(
    s.read(mine), t=t, n_features=d.n_features // d.feature_pool, max_label_len=d.max_label_len, n_rows=rows
  )


def train_host_batch(
  s: DataSplit,
  config: ml_collections.ConfigDict,
  step: int,
  *,
  process_index: int | None = None,
  process_count: int | None = None,
) -> dict[str, np.ndarray]:
  """This process's rows of global training batch `step` (a pure function of (seed, step))."""
  idx = train_batch_indices(s, config, step)
  return _host_rows(s, config, idx, config.data.batch_size, "batch_size", process_index, process_count)


def train_batch_indices(s: DataSplit, config: ml_collections.ConfigDict, step: int) -> np.ndarray:
  """Global record indices of training batch `step` (every process's rows), as `config.data` samples them."""
  d = config.data
  lengths = s.n_time_steps if d.length_aware else None
  return sampler.train_batch_indices(
    d.seed, step, s.days, d.batch_size, d.days_per_batch, lengths=lengths, window=d.length_window
  )


def eval_plan(s: DataSplit, eval_batch_size: int) -> list[np.ndarray]:
  """Global record indices of each eval batch: per day, in order, every kept trial exactly once."""
  return sampler.eval_batch_indices(s.day_indices(), eval_batch_size)


def eval_host_batch(
  s: DataSplit,
  config: ml_collections.ConfigDict,
  idx: np.ndarray,
  *,
  process_index: int | None = None,
  process_count: int | None = None,
) -> dict[str, np.ndarray]:
  """This process's rows of the eval batch of global indices `idx`, padded to eval_batch_size rows in all."""
  return _host_rows(s, config, idx, config.data.eval_batch_size, "eval_batch_size", process_index, process_count)
