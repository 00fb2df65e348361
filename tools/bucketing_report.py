"""Padding waste and compiled shapes of length bucketing on a t15-like length distribution.

Trial lengths come from the synthetic generator's 't15' profile (20 ms bins, ~2-30 s, no features are
generated), spread over the 45 sessions like the release's 8,234 training trials; batches follow the
reference recipe (config.data.batch_size trials from days_per_batch days).

python tools/bucketing_report.py [--config=configs/gru_baseline.py] [--batches=2000] [--buckets='256;512;1280,...']
"""

import os

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from b2t_jax.data import batching, sampler
from b2t_jax.data.synthetic import SyntheticT15

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "gru_baseline.py"),
  "config whose batch recipe and time_buckets are measured",
)
_BATCHES = flags.DEFINE_integer("batches", 2000, "training batches sampled")
_TRIALS = flags.DEFINE_integer("trials", 8234, "training trials in all (the release has 8,234)")
_PROFILE = flags.DEFINE_string("profile", "t15", "synthetic length profile")
_BUCKETS = flags.DEFINE_list(
  "buckets",
  [],
  "alternative bucket sets to compare: comma-separated sets of "
  "';'-separated lengths, e.g. '512;1024;1536,1024;1280;1536' (besides "
  "config.data.time_buckets)",
)
BIN_S = 0.02  # seconds per bin


def lengths_by_day(n_days: int, n_trials: int, profile: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  gen = SyntheticT15(seed, length_profile=profile)
  rng = np.random.default_rng(seed)
  days = np.sort(rng.integers(0, n_days, n_trials))
  return days, np.array([gen.layout(rng)[-1] for _ in range(n_trials)])


def report(days, lengths, buckets, batch_size, days_per_batch, n_batches, seed) -> dict:
  index = {int(d): np.flatnonzero(days == d) for d in np.unique(days)}
  used, padded, exact, shapes = 0, 0, 0, set()
  for step in range(n_batches):
    idx = sampler.train_batch_indices(seed, step, index, batch_size, days_per_batch)
    t = batching.bucket_length(int(lengths[idx].max()), buckets)
    shapes.add(t)
    used += int(lengths[idx].sum())
    padded += t * len(idx)
    exact += int(lengths[idx].max()) * len(idx)
  return {
    "buckets": tuple(buckets),
    "waste": 1 - used / padded,
    "waste_exact_max": 1 - used / exact,
    "shapes": sorted(shapes),
  }


def main(argv):
  del argv
  d = _CONFIG.value.data
  days, lengths = lengths_by_day(len(d.sessions), _TRIALS.value, _PROFILE.value)
  q = np.percentile(lengths * BIN_S, [0, 5, 50, 95, 100])
  print(
    f"{len(lengths)} trials, length s: min {q[0]:.1f}  p5 {q[1]:.1f}  median {q[2]:.1f}  p95 {q[3]:.1f}  "
    f"max {q[4]:.1f}  (profile {_PROFILE.value!r})"
  )
  print(f"batches: {_BATCHES.value} x {d.batch_size} trials from {d.days_per_batch} days (seed {d.seed})")
  sets = [tuple(d.time_buckets)] + [tuple(int(v) for v in b.split(";")) for b in _BUCKETS.value]
  for buckets in sets:
    r = report(days, lengths, buckets, d.batch_size, d.days_per_batch, _BATCHES.value, d.seed)
    print(
      f"buckets {r['buckets']}: padding waste {100 * r['waste']:.1f}% of padded bins "
      f"({100 * r['waste_exact_max']:.1f}% if padded to each batch's own max, one shape per batch); "
      f"compiled shapes {len(r['shapes'])}: {r['shapes']}"
    )


if __name__ == "__main__":
  app.run(main)
