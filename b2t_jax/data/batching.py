"""Padding trials into fixed-shape batches: time padded up to one of a few buckets, labels to a fixed length."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from b2t_jax.data.t15 import Trial


def bucket_length(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= n; an error naming the config field when none is."""
  for b in sorted(buckets):
    if n <= b:
      return int(b)
  raise ValueError(f"a batch needs {n} time bins but the largest of config.data.time_buckets is "
                   f"{max(buckets)}; add a larger bucket")


def check_buckets(trials: Sequence[Trial], buckets: Sequence[int], where: str) -> None:
  """Fails early (at load time, naming the trial) when a trial is longer than every bucket."""
  longest = max(trials, key=lambda t: t.n_time_steps)
  if longest.n_time_steps > max(buckets):
    raise ValueError(f"{where}: {longest.session} trial_{longest.index_in_file:04d} has {longest.n_time_steps} "
                     f"bins, more than the largest of config.data.time_buckets={tuple(buckets)}; add a bucket")


def make_batch(trials: Sequence[Trial], indices: np.ndarray, *, buckets: Sequence[int], max_label_len: int,
               n_rows: int | None = None) -> dict[str, np.ndarray]:
  """Pads `trials[indices]` into a batch of `n_rows` rows (default len(indices)); extra rows have weight 0.

  Keys: features (B, T, F) f32, n_time_steps (B,), labels (B, L), label_lens (B,), day (B,), weight (B,) f32.
  """
  n_rows = len(indices) if n_rows is None else n_rows
  chosen = [trials[i] for i in indices]
  t = bucket_length(max(tr.n_time_steps for tr in chosen), buckets)
  f = chosen[0].features.shape[1]
  batch = {
      "features": np.zeros((n_rows, t, f), np.float32),
      "n_time_steps": np.zeros((n_rows,), np.int32),
      "labels": np.zeros((n_rows, max_label_len), np.int32),
      "label_lens": np.zeros((n_rows,), np.int32),
      "day": np.zeros((n_rows,), np.int32),
      "weight": np.zeros((n_rows,), np.float32),
  }
  for r, tr in enumerate(chosen):
    batch["features"][r, :tr.n_time_steps] = tr.features
    batch["n_time_steps"][r] = tr.n_time_steps
    if tr.labels is not None:
      batch["labels"][r, :len(tr.labels)] = tr.labels
      batch["label_lens"][r] = len(tr.labels)
    batch["day"][r] = tr.day
    batch["weight"][r] = 1.0
  return batch
