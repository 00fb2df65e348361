"""Padding waste and compiled shapes of length bucketing on a t15-like length distribution, with the reference's
length-blind batches and with length-aware ones (config.data.length_aware).

Trial lengths come from the synthetic generator's 't15' profile (20 ms bins, ~3-27 s, no features are
generated), spread over the 45 sessions like the release's 8,234 training trials; batches follow the
reference recipe (config.data.batch_size trials from days_per_batch days). For each sampler it also reports how
evenly trials are drawn: the spread of per-trial draw counts against their mean (1.0 would be exactly uniform).

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
  "config whose batch recipe, time_buckets and length_window are measured",
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
  return days, gen.trial_lengths(rng, n_trials)


def report(days, lengths, buckets, batch_size, days_per_batch, n_batches, seed, length_window=None) -> dict:
  """Waste of padding each batch to its bucket (and to its own max); `length_window` set = length-aware batches."""
  index = {int(d): np.flatnonzero(days == d) for d in np.unique(days)}
  used, padded, exact, shapes = 0, 0, 0, set()
  draws = np.zeros(len(lengths), np.int64)
  aware = {} if length_window is None else {"lengths": lengths, "window": length_window}
  for step in range(n_batches):
    idx = sampler.train_batch_indices(seed, step, index, batch_size, days_per_batch, **aware)
    np.add.at(draws, idx, 1)
    t = batching.bucket_length(int(lengths[idx].max()), buckets)
    shapes.add(t)
    used += int(lengths[idx].sum())
    padded += t * len(idx)
    exact += int(lengths[idx].max()) * len(idx)
  short, long = lengths <= np.median(lengths), lengths > np.median(lengths)
  return {
    "buckets": tuple(buckets),
    "waste": 1 - used / padded,
    "waste_exact_max": 1 - used / exact,
    "shapes": sorted(shapes),
    "draw_cv": float(draws.std() / draws.mean()),
    # Mean draws of the longer half of the trials over the shorter half's: 1.0 = no length preference.
    "long_over_short": float(draws[long].mean() / draws[short].mean()),
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
  for name, window in (("length-blind (reference)", None), (f"length-aware window={d.length_window}", d.length_window)):
    print(f"{name}:")
    for buckets in sets:
      r = report(days, lengths, buckets, d.batch_size, d.days_per_batch, _BATCHES.value, d.seed, window)
      print(
        f"  buckets {r['buckets']}: padding waste {100 * r['waste']:.1f}% of padded bins "
        f"({100 * r['waste_exact_max']:.1f}% if padded to each batch's own max); compiled shapes "
        f"{len(r['shapes'])}: {r['shapes']}; draws per trial cv {r['draw_cv']:.2f}, "
        f"longer/shorter half {r['long_over_short']:.2f}"
      )


if __name__ == "__main__":
  app.run(main)
