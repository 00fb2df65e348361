"""The training input pipeline on Grain (config.data.loader='grain'): the prepared ArrayRecord files read through
`grain.sources.ArrayRecordDataSource`, each record decoded with the dataset's TFDS features, padded and batched
by Grain transforms, in `config.data.grain_workers` worker processes (free of the training process's GIL).

Element j of the pipeline is row j % R of global batch j // R (R = this process's rows): the stateless sampler
(data/sampler.py) picks the batch's records from (seed, step) alone, this process keeps only its rows, and the
time bucket comes from the global batch's lengths in the index, exactly as `pipeline.train_host_batch` does; so
batch k is byte-identical to the thread pipeline's, and a resume at step k starts the pipeline at k.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Iterator
from multiprocessing import shared_memory

import grain
import jax
import ml_collections
import numpy as np
from absl import flags

from b2t_jax.data import batching, sampler, t15
from b2t_jax.data.pipeline import DataSplit, rows_per_process

# Shared-memory blocks still open when their TrainBatches was closed (see TrainBatches): kept reachable until their
# close has begun, whatever becomes of their arrays.
_still_open: list[shared_memory.SharedMemory] = []


class _Plan:
  """Pipeline element j -> {'record', 't'}: the record of row j % rows of this process's share of training
  batch j // rows, and that batch's padded length. The batch's plan is cached (its rows arrive in a row)."""

  def __init__(self, split: DataSplit, config: ml_collections.ConfigDict, rows: int, process_index: int):
    d = config.data
    self.days = split.days
    self.lengths = split.n_time_steps
    self.seed, self.batch_size, self.days_per_batch = d.seed, d.batch_size, d.days_per_batch
    self.length_aware, self.window, self.buckets = d.length_aware, d.length_window, tuple(d.time_buckets)
    self.rows, self.first = rows, process_index * rows
    self._cache: tuple | None = None

  def batch(self, step: int) -> tuple[np.ndarray, int]:
    """This process's records of batch `step` and the batch's padded length."""
    idx = sampler.train_batch_indices(
      self.seed,
      step,
      self.days,
      self.batch_size,
      self.days_per_batch,
      lengths=self.lengths if self.length_aware else None,
      window=self.window,
    )
    t = batching.bucket_length(int(self.lengths[idx].max()), self.buckets)
    return idx[self.first : self.first + self.rows], t

  def __call__(self, j: int) -> dict[str, int]:
    step, row = divmod(int(j), self.rows)
    cached = self._cache  # one read: worker threads may replace it concurrently
    if cached is None or cached[0] != step:
      cached = (step, *self.batch(step))
      self._cache = cached
    return {"record": int(cached[1][row]), "t": cached[2]}


class _ReadTrial:
  """{'record', 't'} -> one padded row of a training batch (the fields of `batching.pad_batch`). The source and
  the decoder are opened on first use, in the process that runs the transform."""

  def __init__(self, split: DataSplit, config: ml_collections.ConfigDict):
    import tensorflow_datasets as tfds

    d = config.data
    self.dataset_dir, self.split = split.dataset_dir, split.name
    self.paths = [str(p) for p in tfds.builder_from_directory(split.dataset_dir).info.splits[split.name].filepaths]
    self.day, self.n_time_steps = split.day, split.n_time_steps
    self.sessions, self.index_in_file = split.sessions, split.index_in_file
    self.pool, self.n_features, self.max_label_len = d.feature_pool, d.n_features // d.feature_pool, d.max_label_len
    self._source = self._decode = None

  def __getstate__(self):
    return {**self.__dict__, "_source": None, "_decode": None}

  def _open(self) -> None:
    import tensorflow_datasets as tfds

    self._decode = tfds.builder_from_directory(self.dataset_dir).info.features.deserialize_example_np
    self._source = grain.sources.ArrayRecordDataSource(self.paths)

  def __call__(self, plan: dict[str, int]) -> dict[str, np.ndarray]:
    if self._source is None:
      self._open()
    i, t = plan["record"], plan["t"]
    ex = self._decode(self._source[i])
    n = int(ex["n_time_steps"])
    if int(ex["day"]) != self.day[i] or n != self.n_time_steps[i]:
      raise t15.DataError(
        f"{self.sessions[self.day[i]]} trial_{self.index_in_file[i]:04d} ({self.split} record {i}): the record "
        "disagrees with the dataset index; the prepared dataset is inconsistent: delete it and prepare it again"
      )
    features = np.zeros((t, self.n_features), np.float32)
    features[:n] = batching.pool_features(np.asarray(ex["features"], np.float32), self.pool)
    phonemes = np.asarray(ex["phonemes"], np.int32)
    labels = np.zeros((self.max_label_len,), np.int32)
    labels[: len(phonemes)] = phonemes
    return {
      "features": features,
      "n_time_steps": np.int32(n),
      "labels": labels,
      "label_lens": np.int32(len(phonemes)),
      "day": np.int32(ex["day"]),
      "weight": np.float32(1.0),
    }


def train_dataset(
  split: DataSplit,
  config: ml_collections.ConfigDict,
  start: int,
  stop: int,
  *,
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.MapDataset:
  """Training batches `start` .. `stop - 1` (this process's rows of each) as a Grain MapDataset: element i is
  batch start + i, equal to `pipeline.train_host_batch(split, config, start + i)`."""
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  rows = rows_per_process(config.data.batch_size, pc, "batch_size")
  return (
    grain.MapDataset.range(start * rows, stop * rows)
    .map(_Plan(split, config, rows, pi))
    .map(_ReadTrial(split, config))
    .batch(rows, drop_remainder=True)
  )


class TrainBatches:
  """Iterates `(step, host batch)` for steps start .. stop - 1 through the Grain pipeline: batches are built
  ahead by `config.data.grain_workers` worker processes (0: threads of this process), each with
  `config.data.prefetch_workers` threads, about `config.data.prefetch` batches ahead in all. Use it as a
  context manager (or call `close()`): it stops the worker processes.

  With worker processes, each batch's arrays lie in shared memory (a `SharedMemory` block per array), and when an
  array is deleted Grain closes its block on a thread of its own. When the cyclic garbage collector deletes an
  array, it finalizes the array's block in the same pass, on the collecting thread: both threads then close the
  block's file descriptor, and the second close can hit a descriptor another thread has just opened (an orbax
  checkpoint's directory: 'fsync ... Bad file descriptor'). Grain's prefetch threads leave their last batches in
  such cycles. So every block that reaches this iterator is held here until its close has begun (`_hold`), which
  keeps it out of the collector's pass, and `close()` collects those cycles at once
  (tests/test_grain_loader.py::test_shared_memory_is_closed_once). Not covered: a batch Grain had built but this
  iterator never yielded, left in such a cycle when the loop stops a few steps before its end (preemption, an
  error); the training loop closes the loader after its last save, so no checkpoint is written meanwhile."""

  def __init__(self, split: DataSplit, config: ml_collections.ConfigDict, start: int, stop: int, **process):
    d = config.data
    self.start, self.stop = start, stop
    ds = train_dataset(split, config, start, stop, **process).to_iter_dataset(
      grain.ReadOptions(num_threads=d.prefetch_workers, prefetch_buffer_size=max(d.prefetch, 1))
    )
    if d.grain_workers > 0:
      if not flags.FLAGS.is_parsed():  # outside an absl app (a notebook, pytest): Grain's workers read its flags
        flags.FLAGS.mark_as_parsed()
      per_worker = max(1, math.ceil(d.prefetch / d.grain_workers))
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.grain_workers, per_worker_buffer_size=per_worker))
    self._it = iter(ds)
    self._held: list[shared_memory.SharedMemory] = []

  def __iter__(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    for step, batch in zip(range(self.start, self.stop), self._it):
      self._hold(batch)
      yield step, batch

  def _hold(self, batch: dict[str, np.ndarray]) -> None:
    """Keeps the batch's shared-memory blocks reachable until their close has begun (`buf` is None from then on;
    dropping a block then is safe: Grain's thread holds it until its close returns)."""
    self._held = [s for s in self._held if s.buf is not None]
    self._held += [s for v in batch.values() if isinstance(s := getattr(v, "shm", None), shared_memory.SharedMemory)]

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    try:
      if close is not None:
        close()
    finally:
      if self._held:
        self._it = None
        gc.collect()  # the batches Grain's finished threads still reference: deleted now, their blocks held
        _still_open[:] = [s for s in _still_open + self._held if s.buf is not None]
        self._held = []

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
