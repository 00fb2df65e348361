"""Stateless batch sampling: training batch k is a pure function of (seed, k), so resume needs only k."""

from __future__ import annotations

import math

import numpy as np


def train_batch_indices(
  seed: int,
  step: int,
  day_indices: dict[int, np.ndarray],
  batch_size: int,
  days_per_batch: int,
  lengths: np.ndarray | None = None,
  window: float = 0.1,
) -> np.ndarray:
  """The reference recipe: `days_per_batch` distinct days drawn uniformly, then `batch_size / days_per_batch`
  trials per day drawn with replacement. Returns trial indices (batch_size,), grouped by day.

  With `lengths` (every record's length in bins; config.data.length_aware) the days are drawn the same way, but
  each day draws from the `window` fraction of its trials (at least batch_size / days_per_batch of them) whose
  lengths are nearest an anchor trial's, drawn uniformly from the chosen days."""
  if batch_size % days_per_batch:
    raise ValueError(
      f"config.data.batch_size={batch_size} must be a multiple of config.data.days_per_batch={days_per_batch}"
    )
  days = np.asarray(sorted(day_indices))
  if len(days) < days_per_batch:
    raise ValueError(
      f"config.data.days_per_batch={days_per_batch} but the training split has only "
      f"{len(days)} day(s) with trials; lower days_per_batch"
    )
  rng = np.random.default_rng([seed, step])
  chosen = rng.choice(days, size=days_per_batch, replace=False)
  per_day = batch_size // days_per_batch
  if lengths is None:
    return np.concatenate([rng.choice(day_indices[d], size=per_day, replace=True) for d in chosen])
  # Length-aware: one anchor trial drawn uniformly from the chosen days' trials sets the batch's length; each
  # day then draws from its trials nearest that length, so the batch pads to little more than its own trials.
  anchor = lengths[rng.choice(np.concatenate([day_indices[d] for d in chosen]))]
  out = []
  for d in chosen:
    idx = day_indices[d]
    k = min(len(idx), max(per_day, math.ceil(window * len(idx))))
    near = idx[np.argsort(np.abs(lengths[idx].astype(np.int64) - int(anchor)), kind="stable")[:k]]
    out.append(rng.choice(near, size=per_day, replace=True))
  return np.concatenate(out)


def eval_batch_indices(day_indices: dict[int, np.ndarray], batch_size: int) -> list[np.ndarray]:
  """Per-day eval batches, as the reference validates: each day's trials in order, in chunks of at most
  `batch_size`; together they cover every trial exactly once."""
  return [idx[s : s + batch_size] for _, idx in sorted(day_indices.items()) for s in range(0, len(idx), batch_size)]
