"""Reading the Brain-to-Text '25 ("t15") HDF5 release (SPEC §1), with errors that name file, trial and field.

Layout: `<root>/<session>/data_{train,val,test}.hdf5`, one group `trial_%04d` per trial holding
`input_features` (T, 512) float32, `seq_class_ids` and `transcription` (zero-padded ints, train/val only)
and attrs `n_time_steps`, `seq_len`, `sentence_label` (train/val only), `session`, `block_num`, `trial_num`.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Sequence

import h5py
import numpy as np
from absl import logging

# Logit index -> phoneme (SPEC §2). Index 0 is the CTC blank, 40 the word boundary.
PHONEMES = ("BLANK", "AA", "AE", "AH", "AO", "AW", "AY", "B", "CH", "D", "DH", "EH", "ER", "EY", "F", "G", "HH",
            "IH", "IY", "JH", "K", "L", "M", "N", "NG", "OW", "OY", "P", "R", "S", "SH", "T", "TH", "UH", "UW",
            "V", "W", "Y", "Z", "ZH", " | ")
# The t15 sessions in release order: a trial's day index is its session's position here (SPEC §1).
T15_SESSIONS = tuple(
    [f"t15.2023.{d}" for d in (
        "08.11", "08.13", "08.18", "08.20", "08.25", "08.27", "09.01", "09.03", "09.24", "09.29", "10.01",
        "10.06", "10.08", "10.13", "10.15", "10.20", "10.22", "11.03", "11.04", "11.17", "11.19", "11.26",
        "12.03", "12.08", "12.10", "12.17", "12.29")]
    + [f"t15.2024.{d}" for d in (
        "02.25", "03.03", "03.08", "03.15", "03.17", "04.25", "04.28", "05.10", "06.14", "07.19", "07.21",
        "07.28")]
    + [f"t15.2025.{d}" for d in ("01.10", "01.12", "03.14", "03.16", "03.30", "04.13")])
BLANK_ID = 0
SIL_ID = len(PHONEMES) - 1
SPLITS = ("train", "val", "test")
TRIAL_FMT = "trial_{:04d}"


class DataError(ValueError):
  """A problem with the data on disk; the message names the file, trial and field and what to do."""


@dataclasses.dataclass
class Trial:
  features: np.ndarray          # (n_time_steps, n_features) float32, possibly feature-pooled
  labels: np.ndarray | None     # (seq_len,) int32 phoneme ids 1..40, None for unlabelled (test) trials
  sentence: str | None
  day: int                      # position of the session in the configured session list
  session: str
  block: int
  trial: int                    # trial number within its block (attr `trial_num`)
  index_in_file: int            # the N of trial_N

  @property
  def n_time_steps(self) -> int:
    return int(self.features.shape[0])


@dataclasses.dataclass
class Split:
  """All trials of one split, in session-list order then file order (the competition's order)."""

  name: str
  trials: list[Trial]
  skipped: dict[str, int]       # reason -> number of trials skipped (on_bad_trial='skip')

  def __len__(self) -> int:
    return len(self.trials)

  def day_indices(self) -> dict[int, np.ndarray]:
    """day -> indices of that day's trials in `trials` (ascending)."""
    by_day: dict[int, list[int]] = collections.defaultdict(list)
    for i, t in enumerate(self.trials):
      by_day[t.day].append(i)
    return {d: np.asarray(v, np.int64) for d, v in sorted(by_day.items())}


def pool_features(x: np.ndarray, pool: int) -> np.ndarray:
  """Averages each group of `pool` adjacent feature columns: (T, F) -> (T, F // pool)."""
  if pool == 1:
    return x
  t, f = x.shape
  return x.reshape(t, f // pool, pool).mean(axis=-1, dtype=np.float32)


def _decode_str(v) -> str:
  if isinstance(v, bytes):
    return v.decode("utf-8")
  if isinstance(v, np.ndarray):
    return _decode_str(v.item())
  return str(v)


class _TrialReader:
  """Validates one trial group; every failure is a DataError naming file, trial and field."""

  def __init__(self, path: str, n_features: int, labelled: bool, max_label_len: int):
    self.path, self.n_features, self.labelled, self.max_label_len = path, n_features, labelled, max_label_len

  def fail(self, name: str, field: str, msg: str) -> DataError:
    return DataError(f"{self.path}: {name}: field '{field}': {msg}")

  def attr(self, g, name: str, key: str):
    if key not in g.attrs:
      raise self.fail(name, key, "missing attribute (every trial needs it; is this a t15 HDF5 file?)")
    return g.attrs[key]

  def dataset(self, g, name: str, key: str) -> np.ndarray:
    if key not in g:
      raise self.fail(name, key, "missing dataset (every trial needs it; is this a t15 HDF5 file?)")
    return np.asarray(g[key][()])

  def read(self, g, name: str) -> tuple[np.ndarray, np.ndarray | None, str | None, int, int]:
    x = self.dataset(g, name, "input_features")
    if x.ndim != 2 or x.shape[1] != self.n_features:
      raise self.fail(name, "input_features", f"shape {x.shape}, expected (n_time_steps, {self.n_features}) "
                      "(config.data.n_features)")
    if x.shape[0] == 0:
      raise self.fail(name, "input_features", "zero-length trial")
    n_t = int(self.attr(g, name, "n_time_steps"))
    if n_t != x.shape[0]:
      raise self.fail(name, "n_time_steps", f"attribute says {n_t} bins, input_features has {x.shape[0]}")
    bad = ~np.isfinite(x)
    if bad.any():
      raise self.fail(name, "input_features", f"{int(bad.sum())} non-finite values (NaN/Inf), first at bin "
                      f"{int(np.argwhere(bad)[0][0])}; fix the file or set config.data.on_bad_trial='skip'")
    block, trial = int(self.attr(g, name, "block_num")), int(self.attr(g, name, "trial_num"))
    if not self.labelled:
      return x.astype(np.float32), None, None, block, trial
    ids = self.dataset(g, name, "seq_class_ids").astype(np.int64).reshape(-1)
    seq_len = int(self.attr(g, name, "seq_len"))
    if not 0 <= seq_len <= ids.shape[0]:
      raise self.fail(name, "seq_len", f"{seq_len} is outside 0..{ids.shape[0]} (length of seq_class_ids)")
    labels = ids[:seq_len]
    if labels.size and (labels.min() < 1 or labels.max() > SIL_ID):
      raise self.fail(name, "seq_class_ids", f"ids must lie in 1..{SIL_ID}, found {labels.min()}..{labels.max()}")
    if seq_len > self.max_label_len:
      raise self.fail(name, "seq_len", f"{seq_len} phonemes exceed config.data.max_label_len="
                      f"{self.max_label_len}; raise it")
    sentence = _decode_str(self.attr(g, name, "sentence_label"))
    return x.astype(np.float32), labels.astype(np.int32), sentence, block, trial


def read_file(path: str, *, day: int, session: str, labelled: bool, n_features: int = 512,
              feature_pool: int = 1, max_label_len: int = 10_000, on_bad_trial: str = "error",
              skipped: collections.Counter | None = None) -> list[Trial]:
  """Reads every `trial_%04d` group of one session file, validating each (see module doc)."""
  if on_bad_trial not in ("error", "skip"):
    raise ValueError(f"config.data.on_bad_trial={on_bad_trial!r}: expected 'error' or 'skip'")
  reader = _TrialReader(path, n_features, labelled, max_label_len)
  try:
    f = h5py.File(path, "r")
  except OSError as e:
    raise DataError(f"{path}: cannot be opened as HDF5 ({e}); the file is corrupt or truncated, "
                    "download it again") from e
  trials = []
  with f:
    names = sorted(k for k in f.keys() if k.startswith("trial_"))
    expected = [TRIAL_FMT.format(i) for i in range(len(names))]
    if names != expected:
      missing = sorted(set(expected) - set(names))
      raise DataError(f"{path}: trial groups are not contiguous: expected trial_0000..trial_{len(names) - 1:04d}, "
                      f"missing {missing[:5]}; the file is incomplete")
    for i, name in enumerate(names):
      g = f[name]
      try:
        x, labels, sentence, block, trial = reader.read(g, name)
        sess_attr = _decode_str(reader.attr(g, name, "session"))
        if sess_attr != session:
          raise reader.fail(name, "session", f"says {sess_attr!r} but the file sits in folder {session!r}")
      except DataError as e:
        if on_bad_trial == "error":
          raise
        reason = str(e).split("field ", 1)[-1].split(":", 1)[0]
        logging.warning("skipping %s", e)
        if skipped is not None:
          skipped[reason] += 1
        continue
      trials.append(Trial(pool_features(x, feature_pool), labels, sentence, day, session, block, trial, i))
  return trials


def load_split(data_dir: str, sessions: Sequence[str], split: str, *, n_features: int = 512,
               feature_pool: int = 1, max_label_len: int = 10_000, on_bad_trial: str = "error") -> Split:
  """Loads one split of every session folder under `data_dir` (SPEC §1 layout).

  Session folders must be named in `sessions` (their position is the day index). Sessions without a
  file for this split are skipped (the release has sessions without val/test data).
  """
  if split not in SPLITS:
    raise ValueError(f"split {split!r}: expected one of {SPLITS}")
  if not os.path.isdir(data_dir):
    raise DataError(f"data_dir {data_dir!r} does not exist; point --config.data_dir at the hdf5_data_final "
                    "folder of the t15 release (or leave it empty to generate synthetic data)")
  day_of = {s: i for i, s in enumerate(sessions)}
  folders = sorted(e for e in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, e)))
  unknown = [s for s in folders if s not in day_of]
  if unknown:
    raise DataError(f"{data_dir}: session folder(s) {unknown[:5]} are not in config.data.sessions "
                    f"({len(sessions)} sessions); add them to the list (the position is the day index) "
                    "or remove the folders")
  if not folders:
    raise DataError(f"{data_dir}: no session folders found (expected e.g. {data_dir}/{sessions[0]}/data_train.hdf5)")
  trials: list[Trial] = []
  skipped: collections.Counter = collections.Counter()
  without = []
  for session in sorted(folders, key=day_of.__getitem__):
    path = os.path.join(data_dir, session, f"data_{split}.hdf5")
    if not os.path.exists(path):
      without.append(session)
      continue
    trials += read_file(path, day=day_of[session], session=session, labelled=split != "test",
                        n_features=n_features, feature_pool=feature_pool, max_label_len=max_label_len,
                        on_bad_trial=on_bad_trial, skipped=skipped)
  if without:
    logging.info("%d session(s) have no %s file: %s", len(without), split, ", ".join(without))
  if skipped:
    logging.warning("%s split: skipped %d trial(s): %s", split, sum(skipped.values()), dict(skipped))
  return Split(split, trials, dict(skipped))


def load_split_from_config(config, split: str) -> Split:
  """`load_split` with every option taken from `config.data`."""
  d = config.data
  return load_split(d.data_dir, d.sessions, split, n_features=d.n_features, feature_pool=d.feature_pool,
                    max_label_len=d.max_label_len, on_bad_trial=d.on_bad_trial)
