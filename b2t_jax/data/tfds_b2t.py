"""A TFDS builder for the t15 HDF5 release: one ArrayRecord example per trial, for random access.

The manual dir is the `hdf5_data_final` root (SPEC §1). Every trial is validated by the t15 reader
(`config.data.on_bad_trial` decides between stopping and skipping; skip counts per reason are stored in
the dataset's metadata). Examples keep the release's order (session-list order, then file order), and the
metadata holds a per-split index (day, length, label length, ...) so a sampler can plan batches without
reading a single feature. Features are stored at full width (512); feature pooling happens when reading.

  python tools/prepare_data.py --hdf5_dir=.../hdf5_data_final --data_dir=DIR     # DIR may be gs://...
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from b2t_jax.data import t15

NAME = "b2t_t15"  # the TFDS name of the builder below (snake case of the class name)
VERSION = "1.0.0"


def tree_entries(hdf5_dir: str) -> dict[str, list[int]]:
  """Relative path -> [size, mtime_ns] of every .hdf5/.h5 file under `hdf5_dir`: what a dataset is built from."""
  out = {}
  for dirpath, _, files in os.walk(hdf5_dir):
    for name in files:
      if name.endswith((".hdf5", ".h5")):
        full = os.path.join(dirpath, name)
        st = os.stat(full)
        out[os.path.relpath(full, hdf5_dir)] = [st.st_size, st.st_mtime_ns]
  return out


def ctc_min_len(labels: np.ndarray) -> int:
  """Fewest CTC frames the labels need: one per label plus a blank between equal neighbours."""
  labels = np.asarray(labels)
  return int(len(labels) + np.sum(labels[1:] == labels[:-1]))


class B2tT15(tfds.core.GeneratorBasedBuilder):
  """The Brain-to-Text '25 (t15) release: splits train / val / test, one example per trial."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {str(VERSION): "t15 HDF5 trials as ArrayRecord examples, with a per-split index in the metadata."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download the Brain-to-Text '25 release and pass its hdf5_data_final folder (the one holding the "
    "t15.* session folders) as the manual dir: tools/prepare_data.py --hdf5_dir=.../hdf5_data_final"
  )

  def __init__(
    self, *, sessions: Sequence[str] = t15.T15_SESSIONS, n_features: int = 512, on_bad_trial: str = "error", **kwargs
  ):
    self._sessions = tuple(sessions)
    self._n_features = n_features
    self._on_bad_trial = on_bad_trial
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    f = tfds.features
    return tfds.core.DatasetInfo(
      builder=self,
      description="Intracortical speech BCI trials (t15): 20 ms bins of neural features with phoneme labels.",
      features=f.FeaturesDict(
        {
          "features": f.Tensor(shape=(None, self._n_features), dtype=np.float32),  # (n_time_steps, 512)
          "phonemes": f.Tensor(shape=(None,), dtype=np.int32),  # ids 1..40, unpadded; empty for test
          "transcription": f.Text(),  # the `transcription` dataset as text; "" for test
          "sentence": f.Text(),  # attr sentence_label; "" for test
          "session": f.Text(),
          "day": np.int32,  # position of the session in the session list
          "block": np.int32,
          "trial": np.int32,
          "index_in_file": np.int32,  # N of the trial_N group
          "n_time_steps": np.int32,
        }
      ),
      metadata=tfds.core.MetadataDict(),
      disable_shuffling=True,  # keep the release's (competition) order
      homepage="https://github.com/Neuroprosthetics-Lab/nejm-brain-to-text",
    )

  def _split_generators(self, dl_manager):
    root = str(dl_manager.manual_dir)
    meta = self.info.metadata
    meta.update(
      sessions=list(self._sessions),
      n_features=self._n_features,
      on_bad_trial=self._on_bad_trial,
      hdf5_dir=root,
      hdf5_files=tree_entries(root),
      index={},
      skipped={},
    )
    out = {}
    for split in t15.SPLITS:
      skipped: collections.Counter = collections.Counter()
      files = t15.session_files(root, self._sessions, split, on_bad_trial=self._on_bad_trial, skipped=skipped)
      meta["skipped"][split] = dict(skipped)
      if files:
        out[split] = self._generate_examples(split, files, skipped)
    if "train" not in out:
      raise t15.DataError(
        f"{root}: no data_train.hdf5 in any session folder listed in the config; is this the hdf5_data_final folder?"
      )
    return out

  def _generate_examples(
    self, split: str, files: list[tuple[int, str, str]], skipped: collections.Counter
  ) -> Iterator[tuple[int, dict]]:
    index = {k: [] for k in ("day", "n_time_steps", "label_len", "ctc_len", "index_in_file")}
    key = 0
    for day, session, path in files:
      for tr in t15.iter_file(
        path,
        day=day,
        session=session,
        labelled=split != "test",
        n_features=self._n_features,
        on_bad_trial=self._on_bad_trial,
        skipped=skipped,
      ):
        labels = np.zeros((0,), np.int32) if tr.labels is None else tr.labels
        index["day"].append(day)
        index["n_time_steps"].append(tr.n_time_steps)
        index["label_len"].append(len(labels))
        index["ctc_len"].append(ctc_min_len(labels))
        index["index_in_file"].append(tr.index_in_file)
        yield (
          key,
          {
            "features": tr.features,
            "phonemes": labels,
            "transcription": tr.transcription or "",
            "sentence": tr.sentence or "",
            "session": session,
            "day": day,
            "block": tr.block,
            "trial": tr.trial,
            "index_in_file": tr.index_in_file,
            "n_time_steps": tr.n_time_steps,
          },
        )
        key += 1
    # Generators run to completion before the metadata is written, so these land in metadata.json.
    self.info.metadata["index"][split] = index
    self.info.metadata["skipped"][split] = dict(skipped)
    if not key:
      raise t15.DataError(
        f"the {split} split has no valid trial left (skipped: {dict(skipped)}); check the files or the session list"
      )


def differences(meta: dict, hdf5_dir: str, options: dict) -> list[str]:
  """How `hdf5_dir` and the build `options` differ from what a prepared dataset's metadata records ([] if not)."""
  out = []
  for k, v in options.items():
    if meta.get(k) != v:
      was, now = (
        (f"a {len(meta.get(k) or [])}-session list", f"another of {len(v)}")
        if k == "sessions"
        else (repr(meta.get(k)), repr(v))
      )
      out.append(f"config.data.{k}: prepared with {was}, now {now}")
  if "hdf5_files" not in meta:
    return out + ["it does not record its HDF5 files (prepared by an older version)"]
  was, now = meta["hdf5_files"], tree_entries(hdf5_dir)
  changed = sorted(p for p in was.keys() & now.keys() if list(was[p]) != now[p])
  for what, paths in (
    ("new", sorted(now.keys() - was.keys())),
    ("gone", sorted(was.keys() - now.keys())),
    ("changed (size or modification time)", changed),
  ):
    if paths:
      more = f" and {len(paths) - 5} more" if len(paths) > 5 else ""
      out.append(f"HDF5 file(s) {what}: {', '.join(paths[:5])}{more}")
  return out


def prepare(
  hdf5_dir: str,
  data_dir: str,
  *,
  sessions: Sequence[str] = t15.T15_SESSIONS,
  n_features: int = 512,
  on_bad_trial: str = "error",
  overwrite: bool = False,
) -> str:
  """Builds the ArrayRecord dataset of `hdf5_dir` under `data_dir`, or reuses the one there when it was built
  from the same HDF5 files (relative paths, sizes, mtimes) and options; returns the dataset folder
  (`data_dir/b2t_t15/<version>`). A dataset built from anything else is a DataError naming the difference,
  or with `overwrite` deleted and rebuilt. `data_dir` may be local or gs://."""
  options = {"sessions": list(sessions), "n_features": n_features, "on_bad_trial": on_bad_trial}
  existing = epath.Path(data_dir) / NAME / VERSION
  if (existing / "dataset_info.json").exists():
    diff = differences(dict(tfds.builder_from_directory(str(existing)).info.metadata or {}), hdf5_dir, options)
    if diff and not overwrite:
      raise t15.DataError(
        f"{existing} was built from other HDF5 files or options than this run's ({hdf5_dir}): "
        f"{'; '.join(diff)}. Rerun with --overwrite to rebuild it, or give another --data_dir"
      )
    if diff:
      logging.warning("rebuilding %s (--overwrite): %s", existing, "; ".join(diff))
      existing.rmtree()
  builder = B2tT15(data_dir=data_dir, sessions=sessions, n_features=n_features, on_bad_trial=on_bad_trial)
  builder.download_and_prepare(
    file_format="array_record", download_config=tfds.download.DownloadConfig(manual_dir=hdf5_dir)
  )
  return str(builder.data_dir)
