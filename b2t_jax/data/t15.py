"""Reading the Brain-to-Text '25 ("t15") HDF5 release (SPEC §1), with errors that name file, trial and field.

Layout: `<root>/<session>/data_{train,val,test}.hdf5`, one group `trial_%04d` per trial holding
`input_features` (T, 512) float32, `seq_class_ids` and `transcription` (zero-padded ints, train/val only)
and attrs `n_time_steps`, `seq_len`, `sentence_label` (train/val only), `session`, `block_num`, `trial_num`.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Iterator, Sequence

import h5py
import numpy as np
from absl import logging

from b2t_jax.vocab import SIL_ID

# The t15 sessions in release order: a trial's day index is its session's position here (SPEC §1).
T15_SESSIONS = tuple(
  [
    f"t15.2023.{d}"
    for d in (
      "08.11",
      "08.13",
      "08.18",
      "08.20",
      "08.25",
      "08.27",
      "09.01",
      "09.03",
      "09.24",
      "09.29",
      "10.01",
      "10.06",
      "10.08",
      "10.13",
      "10.15",
      "10.20",
      "10.22",
      "11.03",
      "11.04",
      "11.17",
      "11.19",
      "11.26",
      "12.03",
      "12.08",
      "12.10",
      "12.17",
      "12.29",
    )
  ]
  + [
    f"t15.2024.{d}"
    for d in (
      "02.25",
      "03.03",
      "03.08",
      "03.15",
      "03.17",
      "04.25",
      "04.28",
      "05.10",
      "06.14",
      "07.19",
      "07.21",
      "07.28",
    )
  ]
  + [f"t15.2025.{d}" for d in ("01.10", "01.12", "03.14", "03.16", "03.30", "04.13")]
)
SPLITS = ("train", "val", "test")
TRIAL_FMT = "trial_{:04d}"


class DataError(ValueError):
  """A problem with the data on disk; the message names the file, trial and field and what to do.

  `reason` is a short stable key (see REASONS) under which `on_bad_trial='skip'` counts what it skipped."""

  def __init__(self, message: str, reason: str = "other"):
    super().__init__(message)
    self.reason = reason


# Skip-count keys: what was wrong, and what one count means (a trial unless stated).
REASONS = {
  "unreadable_file": "a file that cannot be opened as HDF5 (corrupt or truncated); counts files",
  "unreadable_trial": "a trial whose data cannot be read (e.g. a corrupt compressed chunk)",
  "missing_trial_groups": "trial_N groups missing from a file's contiguous numbering; counts missing groups",
  "session_not_in_config": "trials of a session folder absent from config.data.sessions",
  "missing_train_file": "a session folder without data_train.hdf5; counts session folders",
  "missing_field": "a trial without a required dataset or attribute",
  "bad_shape": "input_features not (n_time_steps, n_features)",
  "zero_length": "a trial with 0 time bins",
  "length_mismatch": "attribute n_time_steps disagrees with input_features",
  "non_finite": "NaN/Inf in input_features",
  "bad_seq_len": "seq_len outside 0..len(seq_class_ids)",
  "label_out_of_range": "a phoneme id outside 1..40",
  "session_mismatch": "attribute session differs from the folder name",
  "label_too_long": "more phonemes than config.data.max_label_len",
  "too_short_for_labels": "fewer CTC frames after patching than the labels need",
}


@dataclasses.dataclass
class Trial:
  features: np.ndarray  # (n_time_steps, n_features) float32, feature-pooled once read from a split
  labels: np.ndarray | None  # (seq_len,) int32 phoneme ids 1..40, None for unlabelled (test) trials
  sentence: str | None
  day: int  # position of the session in the configured session list
  session: str
  block: int
  trial: int  # trial number within its block (attr `trial_num`)
  index_in_file: int  # the N of trial_N
  transcription: str | None = None  # the `transcription` dataset decoded from ASCII codes (train/val)

  @property
  def n_time_steps(self) -> int:
    return int(self.features.shape[0])


def decode_str(v) -> str:
  """An HDF5 string attribute (bytes, str or a 0-d array of either, as h5py returns them) as str."""
  if isinstance(v, bytes):
    return v.decode("utf-8")
  if isinstance(v, np.ndarray):
    return decode_str(v.item())
  return str(v)


class _TrialReader:
  """Validates one trial group; every failure is a DataError naming file, trial and field."""

  def __init__(self, path: str, n_features: int, labelled: bool, max_label_len: int):
    self.path, self.n_features, self.labelled, self.max_label_len = path, n_features, labelled, max_label_len

  def fail(self, name: str, field: str, msg: str, reason: str) -> DataError:
    return DataError(f"{self.path}: {name}: field '{field}': {msg}", reason)

  def unreadable(self, name: str, where: str, e: OSError) -> DataError:
    """HDF5 raises a bare OSError for damaged storage (e.g. a compressed chunk that fails to inflate)."""
    return DataError(
      f"{self.path}: {name}: {where}cannot be read ({e}); the file is damaged: download it again "
      "or set config.data.on_bad_trial='skip' to skip the trial",
      "unreadable_trial",
    )

  def attr(self, g, name: str, key: str):
    if key not in g.attrs:
      raise self.fail(
        name,
        key,
        "missing attribute (every trial needs it; is this a t15 HDF5 file?) "
        "Fix the file or set config.data.on_bad_trial='skip'",
        "missing_field",
      )
    return g.attrs[key]

  def dataset(self, g, name: str, key: str) -> np.ndarray:
    if key not in g:
      raise self.fail(
        name,
        key,
        "missing dataset (every trial needs it; is this a t15 HDF5 file?) "
        "Fix the file or set config.data.on_bad_trial='skip'",
        "missing_field",
      )
    try:
      return np.asarray(g[key][()])
    except OSError as e:
      raise self.unreadable(name, f"field '{key}': ", e) from e

  def read(self, g, name: str) -> tuple[np.ndarray, np.ndarray | None, str | None, str | None, int, int]:
    x = self.dataset(g, name, "input_features")
    if x.ndim != 2 or x.shape[1] != self.n_features:
      raise self.fail(
        name,
        "input_features",
        f"shape {x.shape}, expected (n_time_steps, {self.n_features}) (config.data.n_features)",
        "bad_shape",
      )
    if x.shape[0] == 0:
      raise self.fail(
        name,
        "input_features",
        "zero-length trial (0 time bins); set config.data.on_bad_trial='skip' to skip it",
        "zero_length",
      )
    n_t = int(self.attr(g, name, "n_time_steps"))
    if n_t != x.shape[0]:
      raise self.fail(
        name, "n_time_steps", f"attribute says {n_t} bins, input_features has {x.shape[0]}", "length_mismatch"
      )
    bad = ~np.isfinite(x)
    if bad.any():
      raise self.fail(
        name,
        "input_features",
        f"{int(bad.sum())} non-finite values (NaN/Inf), first at bin "
        f"{int(np.argwhere(bad)[0][0])}; fix the file or set config.data.on_bad_trial='skip'",
        "non_finite",
      )
    block, trial = int(self.attr(g, name, "block_num")), int(self.attr(g, name, "trial_num"))
    if not self.labelled:
      return x.astype(np.float32), None, None, None, block, trial
    ids = self.dataset(g, name, "seq_class_ids").astype(np.int64).reshape(-1)
    seq_len = int(self.attr(g, name, "seq_len"))
    if not 0 <= seq_len <= ids.shape[0]:
      raise self.fail(
        name, "seq_len", f"{seq_len} is outside 0..{ids.shape[0]} (length of seq_class_ids)", "bad_seq_len"
      )
    labels = ids[:seq_len]
    if labels.size and (labels.min() < 1 or labels.max() > SIL_ID):
      raise self.fail(
        name,
        "seq_class_ids",
        f"ids must lie in 1..{SIL_ID}, found {labels.min()}..{labels.max()}; "
        "fix the file or set config.data.on_bad_trial='skip'",
        "label_out_of_range",
      )
    if seq_len > self.max_label_len:
      raise self.fail(
        name,
        "seq_len",
        f"{seq_len} phonemes exceed config.data.max_label_len={self.max_label_len}; raise it",
        "label_too_long",
      )
    sentence = decode_str(self.attr(g, name, "sentence_label"))
    codes = self.dataset(g, name, "transcription").astype(np.int64).reshape(-1)
    end = int(np.argmax(codes == 0)) if (codes == 0).any() else len(codes)
    transcription = "".join(map(chr, codes[:end]))
    return x.astype(np.float32), labels.astype(np.int32), sentence, transcription, block, trial


def _check_on_bad_trial(on_bad_trial: str) -> None:
  if on_bad_trial not in ("error", "skip"):
    raise ValueError(f"config.data.on_bad_trial={on_bad_trial!r}: expected 'error' or 'skip'")


def _count_trial_groups(path: str) -> int:
  """Trial groups in a file, 0 when it cannot be opened (used to count a skipped session's trials)."""
  try:
    with h5py.File(path, "r") as f:
      return sum(k.startswith("trial_") for k in f.keys())
  except OSError:
    return 0


def iter_file(
  path: str,
  *,
  day: int,
  session: str,
  labelled: bool,
  n_features: int = 512,
  max_label_len: int = 10_000,
  on_bad_trial: str = "error",
  skipped: collections.Counter | None = None,
) -> Iterator[Trial]:
  """Yields the valid trials of one session file in file order, validating each (see module doc); features
  at full width (pooling is the reader's: batching.pool_features).

  With on_bad_trial='skip' a bad trial (or an unreadable file) is logged and counted in `skipped` under its
  DataError.reason; with 'error' the DataError is raised."""
  _check_on_bad_trial(on_bad_trial)
  skipped = collections.Counter() if skipped is None else skipped

  def bad(e: DataError, n: int = 1) -> None:
    if on_bad_trial == "error":
      raise e
    logging.warning("skipping (config.data.on_bad_trial='skip'): %s", e)
    skipped[e.reason] += n

  def unreadable_file(e: OSError) -> None:
    bad(
      DataError(
        f"{path}: cannot be opened as HDF5 ({e}); the file is corrupt or truncated: download it again "
        "or set config.data.on_bad_trial='skip' to skip the whole file",
        "unreadable_file",
      )
    )

  reader = _TrialReader(path, n_features, labelled, max_label_len)
  try:
    f = h5py.File(path, "r")
  except OSError as e:
    unreadable_file(e)
    return
  with f:
    try:
      keys = list(f.keys())
    except OSError as e:  # a damaged group index: no trial can be found
      unreadable_file(e)
      return
    numbers = sorted(int(k[len("trial_") :]) for k in keys if k.startswith("trial_") and k[6:].isdigit())
    n_expected = numbers[-1] + 1 if numbers else 0
    missing = sorted(set(range(n_expected)) - set(numbers))
    if missing:
      names = [TRIAL_FMT.format(m) for m in missing]
      bad(
        DataError(
          f"{path}: trial groups are not contiguous: expected trial_0000..trial_{n_expected - 1:04d}, "
          f"missing {names[:5]}{' ...' if len(names) > 5 else ''}; the file is incomplete (download it "
          "again, or set config.data.on_bad_trial='skip' to read the groups present)",
          "missing_trial_groups",
        ),
        len(missing),
      )
    for i in numbers:
      name = TRIAL_FMT.format(i)
      try:
        g = f[name]
        x, labels, sentence, transcription, block, trial = reader.read(g, name)
        sess_attr = decode_str(reader.attr(g, name, "session"))
        if sess_attr != session:
          raise reader.fail(
            name, "session", f"says {sess_attr!r} but the file sits in folder {session!r}", "session_mismatch"
          )
      except DataError as e:
        bad(e)
        continue
      except OSError as e:  # the group or its attributes are damaged (datasets are caught by the reader)
        bad(reader.unreadable(name, "", e))
        continue
      yield Trial(x, labels, sentence, day, session, block, trial, i, transcription)


def split_trial_groups(data_dir: str, split: str, *, hint: str) -> Iterator[tuple[str, str, str, h5py.Group]]:
  """(session, path, trial name, group) of every trial of one split under a t15 tree, session folders and trials
  in sorted order, each file open (read-only) while its trials are yielded. For readers of labels and attributes
  only; `hint` ends the error for a missing `data_dir` (what to pass instead)."""
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"data_dir {data_dir!r} does not exist; {hint}")
  found = False
  for session in sorted(os.listdir(data_dir)):
    path = os.path.join(data_dir, session, f"data_{split}.hdf5")
    if not os.path.exists(path):
      continue
    found = True
    with h5py.File(path, "r") as f:
      for name in sorted(k for k in f.keys() if k.startswith("trial_")):
        yield session, path, name, f[name]
  if not found:
    raise FileNotFoundError(f"{data_dir}: no */data_{split}.hdf5 files; is this a t15 data folder?")


def session_files(
  data_dir: str,
  sessions: Sequence[str],
  split: str,
  *,
  on_bad_trial: str = "error",
  skipped: collections.Counter | None = None,
) -> list[tuple[int, str, str]]:
  """(day, session, path) of every session folder's file for `split`, in session-list order.

  Folders not in `sessions` are an error, or with on_bad_trial='skip' skipped and their trials counted
  under 'session_not_in_config'. A folder without data_train.hdf5 is an error, or with 'skip' counted under
  'missing_train_file' (train only); sessions without a val/test file are skipped with a log line (the
  release has sessions without val/test data)."""
  _check_on_bad_trial(on_bad_trial)
  if split not in SPLITS:
    raise ValueError(f"split {split!r}: expected one of {SPLITS}")
  if not os.path.isdir(data_dir):
    raise DataError(
      f"data_dir {data_dir!r} does not exist; point --config.data.data_dir at the hdf5_data_final "
      "folder of the t15 release (or leave it empty to generate synthetic data)"
    )
  day_of = {s: i for i, s in enumerate(sessions)}
  folders = sorted(e for e in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, e)))
  if not folders:
    raise DataError(f"{data_dir}: no session folders found (expected e.g. {data_dir}/{sessions[0]}/data_train.hdf5)")
  unknown = [s for s in folders if s not in day_of]
  if unknown and on_bad_trial == "error":
    raise DataError(
      f"{data_dir}: session folder(s) {unknown[:5]} are not in config.data.sessions "
      f"({len(sessions)} sessions); add them to the list (the position is the day index), "
      "remove the folders, or set config.data.on_bad_trial='skip' to skip them",
      "session_not_in_config",
    )
  for s in unknown:
    n = _count_trial_groups(os.path.join(data_dir, s, f"data_{split}.hdf5"))
    logging.warning("skipping session folder %s (%d %s trials): not in config.data.sessions", s, n, split)
    if skipped is not None and n:
      skipped["session_not_in_config"] += n
  out, without = [], []
  for session in sorted((s for s in folders if s in day_of), key=day_of.__getitem__):
    path = os.path.join(data_dir, session, f"data_{split}.hdf5")
    if os.path.exists(path):
      out.append((day_of[session], session, path))
    else:
      without.append(session)
  if without and split == "train":  # every release session has one: the download is incomplete
    msg = (
      f"{data_dir}: session folder(s) {without[:5]} have no data_train.hdf5 (every t15 session has one); "
      "download them again, remove the folders, or set config.data.on_bad_trial='skip' to skip them"
    )
    if on_bad_trial == "error":
      raise DataError(msg, "missing_train_file")
    logging.warning("skipping (config.data.on_bad_trial='skip'): %s", msg)
    if skipped is not None:
      skipped["missing_train_file"] += len(without)
  elif without:  # the release has sessions without val/test files
    logging.info("%d session(s) have no %s file: %s", len(without), split, ", ".join(without))
  return out
