"""Host input pipelines side by side, in examples/s: the thread prefetcher (config.data.loader='threads') against
Grain (loader='grain'), each with 0, 1 and 2 workers, on trials of the t15 length profile, and the demand a TPU
step would place on the host.

Synthetic data in the t15 layout (512 features, ~2-30 s trials) is written and prepared as the TFDS (ArrayRecord)
dataset that training reads; each pipeline then builds the training batches of the gru_baseline/tpu_v4 recipe
(--batch trials from --days days; this process's rows, padded to the batch's bucket) as the train loop would take
them. Workers: threads for 'threads' (0 = built on the caller's thread), processes for 'grain' (0 = threads of this
process); every pipeline keeps config.data.prefetch batches ahead. The first batch (worker start-up, file
opening) is timed apart; the rate is over the next --steps batches.

Demand: the examples/s one host must deliver = (global batch / hosts) / step time. The step time is the lower
bound tools/aot_compile.py reports for the slice (its JSON: `step_lower_bound_s`, the model FLOPs per chip at the
chip's bf16 peak; `batch`, `hosts`), read from --aot_report, or --demand_step_s with --demand_batch and
--demand_hosts.

python tools/benchmark_input.py [--steps=20] [--rounds=2] [--batch=64] [--aot_report=aot_v4-8.json]
"""

import json
import os
import time

import numpy as np
from absl import app, flags, logging

from b2t_jax import experiment
from b2t_jax.data import batching, grain_loader, pipeline
from configs import gru_baseline

_OUT = flags.DEFINE_string("out", "/tmp/b2t_bench_input", "scratch folder for the synthetic data")
_STEPS = flags.DEFINE_integer("steps", 20, "batches timed per pipeline, after the first")
_BATCH = flags.DEFINE_integer("batch", 64, "trials per batch (this process reads them all)")
_DAYS = flags.DEFINE_integer("days", 4, "days per batch")
_SESSIONS = flags.DEFINE_integer("sessions", 4, "synthetic sessions")
_TRIALS = flags.DEFINE_integer("trials_per_session", 32, "synthetic training trials per session")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "rounds over all pipelines (median per pipeline)")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "worker counts to measure")
_AOT = flags.DEFINE_string("aot_report", "", "a file whose last line is tools/aot_compile.py's JSON (the demand)")
_DEMAND_S = flags.DEFINE_float("demand_step_s", 0.0, "step time for the demand line (without --aot_report)")
_DEMAND_BATCH = flags.DEFINE_integer("demand_batch", 512, "global batch for the demand line (tpu_v4: 512)")
_DEMAND_HOSTS = flags.DEFINE_integer("demand_hosts", 1, "hosts sharing the batch for the demand line")


def make_config():
  c = gru_baseline.get_config()
  c.data.data_dir = ""  # synthetic, generated and prepared under the scratch folder
  c.data.batch_size, c.data.days_per_batch = _BATCH.value, _DAYS.value
  s = c.data.synthetic
  s.n_sessions, s.trials_per_session, s.length_profile = _SESSIONS.value, _TRIALS.value, "t15"
  return c


def loader(split, config, loader_name: str, workers: int, start: int, stop: int):
  """The train loop's iterator of (step, batch) for `loader_name` with `workers` workers."""
  d = config.data
  if loader_name == "threads":
    read = lambda k: pipeline.train_host_batch(split, config, k)
    return batching.Prefetcher(read, range(start, stop), d.prefetch if workers else 0, max(workers, 1))
  c = config.copy_and_resolve_references()
  c.data.grain_workers = workers
  c.data.prefetch_workers = 1 if workers else d.prefetch_workers  # one thread per process; in-process: threads
  return grain_loader.TrainBatches(split, c, start, stop)


def time_loader(split, config, loader_name: str, workers: int, steps: int) -> tuple[float, float, float]:
  """(seconds to the first batch, examples/s over the next `steps` batches, MB/s of padded features)."""
  t0 = time.perf_counter()
  with loader(split, config, loader_name, workers, 0, steps + 1) as batches:
    it = iter(batches)
    next(it)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    nbytes = sum(b["features"].nbytes for _, b in it)
  dt = time.perf_counter() - t1
  return first, steps * config.data.batch_size / dt, nbytes / dt / 1e6


def demand() -> tuple[float, str] | None:
  if _AOT.value:
    with open(_AOT.value) as f:
      r = json.loads(f.read().strip().splitlines()[-1])
    step_s, batch, hosts = r["step_lower_bound_s"], r["batch"], r["hosts"]
    where = f"{r['config']} on {r['topology']} ({hosts} host(s)), batch {batch}, FLOP-bound step {step_s * 1e3:.0f} ms"
  elif _DEMAND_S.value > 0:
    step_s, batch, hosts = _DEMAND_S.value, _DEMAND_BATCH.value, _DEMAND_HOSTS.value
    where = f"batch {batch} over {hosts} host(s) at {step_s * 1e3:.0f} ms per step"
  else:
    return None
  return batch / hosts / step_s, where


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = make_config()
  t0 = time.perf_counter()
  split = experiment.open_data(config, os.path.join(_OUT.value, "work"), ("train",))["train"]
  prep_s = time.perf_counter() - t0
  # Rounds interleave the pipelines (threads w, grain w, next w, ...), so load that comes and goes on a shared
  # machine falls on both; each row reports its median over the rounds.
  runs: dict[tuple[str, int], list] = {}
  for _ in range(_ROUNDS.value):
    for w in map(int, _WORKERS.value):
      for name in ("threads", "grain"):
        runs.setdefault((name, w), []).append(time_loader(split, config, name, w, _STEPS.value))
  rows = [(name, w, *np.median(np.asarray(r), axis=0)) for (name, w), r in sorted(runs.items(), reverse=True)]
  rows.sort(key=lambda r: (r[0] != "threads", r[1]))
  load = os.getloadavg()[0]
  lengths = split.n_time_steps[split.keep]
  print(
    f"{os.cpu_count()} CPU cores, load average {load:.1f} at the end; {len(split)} t15-profile trials "
    f"(mean {lengths.mean():.0f} bins, max {lengths.max()}), batches of {config.data.batch_size} from "
    f"{config.data.days_per_batch} days, prefetch {config.data.prefetch}; data prepared in {prep_s:.0f} s"
  )
  print(f"median of {_ROUNDS.value} interleaved rounds of {_STEPS.value} batches after the first:")
  print(f"{'loader':<9}{'workers':>8}{'first batch s':>15}{'examples/s':>12}{'MB/s':>8}")
  for name, w, first, rate, mbs in rows:
    print(f"{name:<9}{w:>8}{first:>15.2f}{rate:>12.1f}{mbs:>8.0f}")
  best = max(rows, key=lambda r: r[3])
  print(f"fastest: loader={best[0]} with {best[1]} workers, {best[3]:.1f} examples/s")
  need = demand()
  if need:
    rate, where = need
    print(f"demand: {rate:.0f} examples/s per host ({where}); fastest here / demand = {best[3] / rate:.2f}")
  print(
    json.dumps({"load": load, "rows": [dict(zip(("loader", "workers", "first_s", "ex_s", "mb_s"), r)) for r in rows]})
  )


if __name__ == "__main__":
  app.run(main)
