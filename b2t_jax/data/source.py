"""The data-source layer training reads through: a prepared TFDS (ArrayRecord) dataset opened for random access.

Only the per-trial index (day, lengths, label lengths) lives in memory; features are read on demand, so
each process reads only its own rows of a global batch. `config.data.data_dir` may name
  - a TFDS data dir written by tools/prepare_data.py (holding b2t_t15/<version>), or that version folder,
    locally or on gs://;
  - an HDF5 tree (hdf5_data_final layout): it is prepared on first use into a cache folder keyed by the
    tree's contents (relative paths, sizes, mtimes) and the build options, then reused;
  - "" : synthetic HDF5 data is generated into WORKDIR/synthetic_data and prepared next to it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import uuid
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from b2t_jax.data import batching, sampler, t15, tfds_b2t
from b2t_jax.data.synthetic import make_synthetic_dataset
from b2t_jax.patching import n_patches

SKIPS_FILE = "skipped_trials.json"   # written to the workdir: skip counts per split, stage and reason


def find_dataset_dir(path: str) -> str | None:
  """The b2t_t15/<version> folder that `path` is or holds (newest version), else None."""
  if not path:
    return None
  p = epath.Path(path)
  if (p / "dataset_info.json").exists():
    return str(p)
  base = p / tfds_b2t.NAME
  if base.is_dir():
    versions = [v for v in base.iterdir() if (v / "dataset_info.json").exists()]
    if versions:
      return str(max(versions, key=lambda v: tuple(int(x) for x in v.name.split("."))))
  return None


def is_tfds_dir(path: str) -> bool:
  return find_dataset_dir(path) is not None


def tree_key(hdf5_dir: str, options: dict) -> str:
  """A content key of an HDF5 tree: relative paths, sizes and mtimes of its .hdf5 files, plus build options."""
  entries = sorted([rel, *st] for rel, st in tfds_b2t.tree_entries(hdf5_dir).items())
  blob = json.dumps([tfds_b2t.VERSION, options, entries], sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def _build_options(config: ml_collections.ConfigDict) -> dict:
  d = config.data
  return {"sessions": list(d.sessions), "n_features": d.n_features, "on_bad_trial": d.on_bad_trial}


def prepare_atomically(hdf5_dir: str, out_dir: str, options: dict) -> str:
  """Prepares into a private temporary folder, then renames it to `out_dir` (a concurrent preparer loses the
  race harmlessly). Returns the dataset folder."""
  if not is_tfds_dir(out_dir):
    tmp = f"{out_dir}.tmp-{uuid.uuid4().hex[:8]}"
    logging.info("preparing the TFDS dataset of %s into %s", hdf5_dir, out_dir)
    try:
      tfds_b2t.prepare(hdf5_dir, tmp, **options)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)   # leave no half-built folder in the cache
      raise
    try:
      os.rename(tmp, out_dir)
    except OSError:  # someone else finished first
      shutil.rmtree(tmp, ignore_errors=True)
  return find_dataset_dir(out_dir)


def _on_every_process(fn):
  """Process 0 first (a shared filesystem then holds the result for everyone), then the others (a no-op
  there, a local build on hosts that do not share the folder)."""
  if jax.process_index() == 0:
    out = fn()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("b2t_prepare_data")
  if jax.process_index() != 0:
    out = fn()
  return out


def resolve_hdf5_or_tfds(config: ml_collections.ConfigDict, workdir: str) -> str:
  """`config.data.data_dir`, or a synthetic HDF5 tree generated once under the workdir when it is empty."""
  if config.data.data_dir:
    return config.data.data_dir
  out = os.path.join(workdir, "synthetic_data")
  s = config.data.synthetic

  def generate():
    if not os.path.exists(os.path.join(out, ".complete")):
      logging.info("config.data.data_dir is empty: writing synthetic t15 data to %s", out)
      make_synthetic_dataset(out, config.data.sessions, n_sessions=s.n_sessions,
                             trials_per_session=s.trials_per_session, seed=s.seed, noise_std=s.noise_std,
                             length_profile=s.length_profile)
      open(os.path.join(out, ".complete"), "w").close()
    return out

  return _on_every_process(generate)


def resolve_dataset(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The prepared TFDS dataset folder for `config.data.data_dir` (see module doc), preparing it if needed."""
  path = resolve_hdf5_or_tfds(config, workdir)
  found = find_dataset_dir(path)
  if found:
    return found
  if not os.path.isdir(path):
    raise t15.DataError(f"config.data.data_dir={path!r} is neither a prepared TFDS dataset (tools/prepare_data.py) "
                        "nor an existing hdf5_data_final folder")
  options = _build_options(config)
  if not config.data.data_dir:
    out = os.path.join(workdir, "synthetic_tfds")
  else:
    cache = config.data.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "b2t_jax", "tfds")
    os.makedirs(cache, exist_ok=True)
    out = os.path.join(cache, f"{os.path.basename(os.path.normpath(path))}-{tree_key(path, options)}")
  return _on_every_process(lambda: prepare_atomically(path, out, options))


@dataclasses.dataclass
class DataSplit:
  """One split of a prepared dataset: the in-memory index plus a random-access source of the examples."""

  name: str
  dataset_dir: str                # the prepared dataset folder it was opened from
  source: Any                     # tfds ArrayRecordDataSource: len, __getitems__
  day: np.ndarray                 # (N,) per record
  n_time_steps: np.ndarray
  label_len: np.ndarray
  ctc_len: np.ndarray
  index_in_file: np.ndarray
  sessions: tuple
  feature_pool: int
  keep: np.ndarray                # (N,) bool: passed the load-time checks
  skipped: dict                   # {'prepare': {reason: n}, 'load': {reason: n}}

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
        raise t15.DataError(f"{self.describe(i)}: the record disagrees with the dataset index; the prepared "
                            "dataset is inconsistent: delete it and prepare it again")
      labelled = self.name != "test"
      out.append(t15.Trial(
          t15.pool_features(np.asarray(ex["features"], np.float32), self.feature_pool),
          np.asarray(ex["phonemes"], np.int32) if labelled else None,
          _text(ex["sentence"]) if labelled else None, int(ex["day"]), _text(ex["session"]), int(ex["block"]),
          int(ex["trial"]), int(ex["index_in_file"]), _text(ex["transcription"]) if labelled else None))
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


def _text(v) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _check_metadata(meta: dict, config: ml_collections.ConfigDict, dataset_dir: str) -> None:
  d = config.data
  built = list(meta.get("sessions", []))
  if built != list(d.sessions)[:len(built)] or not built:
    raise t15.DataError(f"{dataset_dir} was prepared with a different session list than config.data.sessions "
                        "(the day index is the position in that list); prepare it again with this config's list")
  if meta.get("n_features") != d.n_features:
    raise t15.DataError(f"{dataset_dir} holds {meta.get('n_features')} features per bin but "
                        f"config.data.n_features={d.n_features}")


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
    raise t15.DataError(f"{dataset_dir}: the {split} split has {len(source)} records but its index "
                        f"{len(arrays['day'])}; delete the folder and prepare it again")
  out = DataSplit(split, dataset_dir, source, arrays["day"], arrays["n_time_steps"], arrays["label_len"], arrays["ctc_len"],
                  arrays["index_in_file"], tuple(meta["sessions"]), d.feature_pool,
                  np.ones(len(source), bool), {"prepare": dict(meta.get("skipped", {}).get(split, {})), "load": {}})
  _apply_load_checks(out, config, train=train)
  return out


def _apply_load_checks(s: DataSplit, config: ml_collections.ConfigDict, *, train: bool) -> None:
  d, m = config.data, config.model
  # Uncut length: a trial that fits only without the random cut stays in, and the steps whose cut makes it
  # infeasible mask it out of the CTC mean and count it (losses.feasible_mask), as SPEC §4 asks.
  frames = n_patches(s.n_time_steps, m.patch_size, m.patch_stride)
  problems = {
      "label_too_long": (s.label_len > d.max_label_len,
                         lambda i: f"{s.label_len[i]} phonemes exceed config.data.max_label_len={d.max_label_len}; "
                                   "raise it"),
      "too_short_for_labels": ((frames < np.maximum(s.ctc_len, 1)) & (s.label_len <= d.max_label_len),
                               lambda i: f"{s.n_time_steps[i]} bins give {max(int(frames[i]), 0)} CTC frames after "
                                         f"patching (size {m.patch_size}, stride {m.patch_stride}), but its "
                                         f"{s.label_len[i]} labels need {s.ctc_len[i]}"),
  }
  counts = collections.Counter()
  for reason, (mask, explain) in problems.items():
    bad = np.flatnonzero(mask & s.keep)
    if not len(bad):
      continue
    msg = f"{s.describe(bad[0])}: {explain(bad[0])}"
    if d.on_bad_trial == "error":
      raise t15.DataError(f"{msg} ({len(bad)} such trial(s) in the {s.name} split); set "
                          "config.data.on_bad_trial='skip' to leave them out (counted)", reason)
    logging.warning("skipping %d %s trial(s) (%s), e.g. %s", len(bad), s.name, reason, msg)
    s.keep[bad] = False
    counts[reason] += len(bad)
  s.skipped["load"] = dict(counts)


def write_skips(workdir: str, splits: Sequence[DataSplit]) -> str:
  """Writes WORKDIR/skipped_trials.json: {split: {'prepare': {reason: n}, 'load': {reason: n}, 'kept': n}}."""
  path = epath.Path(workdir) / SKIPS_FILE
  report = {s.name: {**s.skipped, "kept": len(s), "reasons": {r: t15.REASONS[r] for st in s.skipped.values()
                                                                for r in st if r in t15.REASONS}}
            for s in splits}
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = {}                                                        # eval mode rewrites only 'val'
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


def load_split_in_memory(config: ml_collections.ConfigDict, split: str) -> t15.Split:
  """A whole split of a prepared dataset as an in-memory t15.Split (kept trials only; eval-time checks)."""
  s = open_split(find_dataset_dir(config.data.data_dir), config, split, train=False)
  kept = np.flatnonzero(s.keep)
  trials = s.read(kept)
  skipped = collections.Counter(s.skipped["prepare"]) + collections.Counter(s.skipped["load"])
  return t15.Split(split, trials, dict(skipped))


def check_buckets(s: DataSplit, buckets: Sequence[int]) -> None:
  """Fails early, naming the trial, when a kept trial is longer than every bucket."""
  kept = np.flatnonzero(s.keep)
  longest = kept[np.argmax(s.n_time_steps[kept])]
  if s.n_time_steps[longest] > max(buckets):
    raise ValueError(f"{s.describe(longest)} has {s.n_time_steps[longest]} bins, more than the largest of "
                     f"config.data.time_buckets={tuple(buckets)}; add a bucket")


def rows_per_process(n_rows: int, process_count: int, field: str) -> int:
  """Rows of a global batch each process reads; an error naming the config field when they do not divide."""
  if n_rows % process_count:
    raise ValueError(f"config.data.{field}={n_rows} does not divide the {process_count} processes: every process "
                     f"reads an equal share of each batch; make it a multiple of {process_count}")
  return n_rows // process_count


def _host_rows(s: DataSplit, config: ml_collections.ConfigDict, idx: np.ndarray, n_rows: int, field: str,
               process_index: int | None, process_count: int | None) -> dict[str, np.ndarray]:
  """This process's share of the global batch of record indices `idx` (padded to `n_rows` rows in all). The
  time bucket comes from the global batch's lengths (the index), so every process pads to the same shape."""
  d = config.data
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  t = batching.bucket_length(int(s.n_time_steps[idx].max()), d.time_buckets)
  rows = rows_per_process(n_rows, pc, field)
  mine = idx[pi * rows:(pi + 1) * rows]
  return batching.pad_batch(s.read(mine), t=t, n_features=d.n_features // d.feature_pool,
                            max_label_len=d.max_label_len, n_rows=rows)


def train_host_batch(s: DataSplit, config: ml_collections.ConfigDict, step: int, *,
                     process_index: int | None = None, process_count: int | None = None) -> dict[str, np.ndarray]:
  """This process's rows of global training batch `step` (a pure function of (seed, step))."""
  d = config.data
  idx = sampler.train_batch_indices(d.seed, step, s.days, d.batch_size, d.days_per_batch)
  return _host_rows(s, config, idx, d.batch_size, "batch_size", process_index, process_count)


def eval_plan(s: DataSplit, eval_batch_size: int) -> list[np.ndarray]:
  """Global record indices of each eval batch: per day, in order, every kept trial exactly once."""
  return sampler.eval_batch_indices(s.day_indices(), eval_batch_size)


def eval_host_batch(s: DataSplit, config: ml_collections.ConfigDict, idx: np.ndarray, *,
                    process_index: int | None = None, process_count: int | None = None) -> dict[str, np.ndarray]:
  """This process's rows of the eval batch of global indices `idx`, padded to eval_batch_size rows in all."""
  return _host_rows(s, config, idx, config.data.eval_batch_size, "eval_batch_size", process_index, process_count)
