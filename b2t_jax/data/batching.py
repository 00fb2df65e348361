"""Feature pooling, padding trials into fixed-shape batches (time padded up to one of a few buckets, labels to a
fixed length) and a background prefetcher that keeps host batches ready ahead of the device."""

from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from b2t_jax.data.t15 import Trial


def pool_features(x: np.ndarray, pool: int) -> np.ndarray:
  """Averages each group of `pool` adjacent feature columns: (T, F) -> (T, F // pool)."""
  if pool == 1:
    return x
  t, f = x.shape
  return x.reshape(t, f // pool, pool).mean(axis=-1, dtype=np.float32)


def bucket_length(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= n; an error naming the config field when none is."""
  for b in sorted(buckets):
    if n <= b:
      return int(b)
  raise ValueError(
    f"a batch needs {n} time bins but the largest of config.data.time_buckets is {max(buckets)}; add a larger bucket"
  )


def pad_batch(
  chosen: Sequence[Trial], *, t: int, n_features: int, max_label_len: int, n_rows: int | None = None
) -> dict[str, np.ndarray]:
  """Pads `chosen` into a batch of `n_rows` rows (default len(chosen)) of `t` bins; extra rows have weight 0.

  Keys: features (B, T, F) f32, n_time_steps (B,), labels (B, L), label_lens (B,), day (B,), weight (B,) f32.
  """
  n_rows = len(chosen) if n_rows is None else n_rows
  batch = {
    "features": np.zeros((n_rows, t, n_features), np.float32),
    "n_time_steps": np.zeros((n_rows,), np.int32),
    "labels": np.zeros((n_rows, max_label_len), np.int32),
    "label_lens": np.zeros((n_rows,), np.int32),
    "day": np.zeros((n_rows,), np.int32),
    "weight": np.zeros((n_rows,), np.float32),
  }
  for r, tr in enumerate(chosen):
    if tr.n_time_steps > t:
      raise ValueError(
        f"{tr.session} trial_{tr.index_in_file:04d} has {tr.n_time_steps} bins, more than the batch's padded length {t}"
      )
    batch["features"][r, : tr.n_time_steps] = tr.features
    batch["n_time_steps"][r] = tr.n_time_steps
    if tr.labels is not None:
      batch["labels"][r, : len(tr.labels)] = tr.labels
      batch["label_lens"][r] = len(tr.labels)
    batch["day"][r] = tr.day
    batch["weight"][r] = 1.0
  return batch


class Prefetcher:
  """Computes `fn(item)` for each item on background threads (`workers` of them), keeping at most `depth`
  items in flight ahead of the consumer, and yields `(item, fn(item))` in order. depth 0 computes on the
  caller's thread. A worker's exception is re-raised by the iterator; `close()` (or leaving the `with`
  block) cancels what has not started."""

  def __init__(self, fn: Callable, items: Iterable, depth: int, workers: int = 1):
    self._fn, self._items, self._depth = fn, items, depth
    self._pool = (
      concurrent.futures.ThreadPoolExecutor(max(workers, 1), thread_name_prefix="b2t-prefetch") if depth > 0 else None
    )

  def __iter__(self) -> Iterator:
    if self._pool is None:
      for item in self._items:
        yield item, self._fn(item)
      return
    pending: collections.deque = collections.deque()
    for item in self._items:
      pending.append((item, self._pool.submit(self._fn, item)))
      if len(pending) > self._depth:
        done, future = pending.popleft()
        yield done, future.result()
    while pending:
      done, future = pending.popleft()
      yield done, future.result()

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
