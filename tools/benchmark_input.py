"""Input pipeline vs train step, in examples/s, side by side: is the host fast enough to feed the device?

For each config, synthetic data in the t15 layout is written, prepared as the TFDS (ArrayRecord) dataset that
training reads, and then
  - input:  host batches as the train loop builds them (sampler -> random-access reads of this process's rows
            -> feature pooling -> padding), on one thread with nothing else running;
  - train:  the jitted train step on those batches (compiled first, then timed with block_until_ready).

python tools/benchmark_input.py [--configs=demo,gru_baseline] [--gru_batch=8] [--out=/tmp/b2t_bench_input]

gru_baseline keeps its full model and 512 features but runs a batch of --gru_batch trials (2 days) with t15-like
trial lengths (~2-30 s), because its full 64-trial step takes minutes on a small CPU.
"""

import functools
import os
import time

import jax
import numpy as np
from absl import app, flags, logging

from b2t_jax import experiment, sharding
from b2t_jax.data import batching, pipeline
from configs import demo, gru_baseline

_CONFIGS = flags.DEFINE_list("configs", ["demo", "gru_baseline"], "configs to measure")
_OUT = flags.DEFINE_string("out", "/tmp/b2t_bench_input", "scratch folder for the synthetic data")
_INPUT_STEPS = flags.DEFINE_integer("input_steps", 40, "host batches timed")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 20, "train steps timed (demo)")
_GRU_STEPS = flags.DEFINE_integer("gru_steps", 2, "train steps timed (gru_baseline)")
_GRU_BATCH = flags.DEFINE_integer("gru_batch", 8, "gru_baseline batch size for both measurements")


def make_config(name: str):
  if name == "demo":
    c = demo.get_config()  # its own synthetic settings: 8 sessions x 80 trials, demo lengths
  elif name == "gru_baseline":
    c = gru_baseline.get_config()
    c.data.batch_size = _GRU_BATCH.value
    c.data.days_per_batch = 2
    s = c.data.synthetic
    s.n_sessions, s.trials_per_session, s.length_profile = 4, 24, "t15"
  else:
    raise app.UsageError(f"--configs: unknown config {name!r} (demo, gru_baseline)")
  c.data.data_dir = ""  # synthetic, generated and prepared under the workdir
  return c


def time_input(split, config, steps: int, depth: int, workers: int) -> tuple[float, set]:
  """examples/s of building host batches through the train loop's prefetcher (depth 0: on this thread),
  and the padded lengths seen."""
  pipeline.train_host_batch(split, config, 0)  # open files, warm caches
  shapes = set()
  read = functools.partial(pipeline.train_host_batch, split, config)
  t0 = time.perf_counter()
  with batching.Prefetcher(read, range(1, steps + 1), depth, workers) as batches:
    for _, b in batches:
      shapes.add(b["features"].shape[1])
  return steps * config.data.batch_size / (time.perf_counter() - t0), shapes


def time_train(split, config, steps: int) -> tuple[float, float]:
  """examples/s of the jitted train step (after compiling every bucket used) and the compile seconds."""
  exp = experiment.Experiment(config)
  state = exp.init_state()
  batches = [sharding.shard_batch(pipeline.train_host_batch(split, config, k), exp.mesh) for k in range(steps)]
  t0 = time.perf_counter()
  for t in sorted({b["features"].shape[1] for b in batches}):  # one warm-up step per bucket compiles it
    state, m = exp.train_step(state, next(b for b in batches if b["features"].shape[1] == t))
    jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for b in batches:
    state, m = exp.train_step(state, b)
  jax.block_until_ready((state, m))
  return steps * config.data.batch_size / (time.perf_counter() - t0), compile_s


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  rows = []
  for name in _CONFIGS.value:
    config = make_config(name)
    workdir = os.path.join(_OUT.value, name)
    t0 = time.perf_counter()
    data = experiment.open_data(config, workdir, ("train",))["train"]
    prep_s = time.perf_counter() - t0
    input_1, shapes = time_input(data, config, _INPUT_STEPS.value, 0, 1)
    input_rate, _ = time_input(data, config, _INPUT_STEPS.value, config.data.prefetch, config.data.prefetch_workers)
    steps = _GRU_STEPS.value if name == "gru_baseline" else _TRAIN_STEPS.value
    train_rate, compile_s = time_train(data, config, steps)
    mean_len = float(np.mean(data.n_time_steps))
    rows.append((name, config.data.batch_size, mean_len, input_1, input_rate, train_rate, compile_s, prep_s, shapes))
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} CPU cores")
  print(
    "input 1 thread: host batches built on the caller's thread; input prefetch: through the train loop's "
    "prefetcher (config.data.prefetch, prefetch_workers); ratio = input prefetch / train"
  )
  print(
    f"{'config':<14}{'batch':>6}{'mean bins':>10}{'input 1 thread':>16}{'input prefetch':>16}"
    f"{'train step':>12}{'ratio':>8}{'compile s':>11}{'prepare s':>11}  buckets"
  )
  for name, b, mean_len, inp1, inp, tr, comp, prep, shapes in rows:
    print(
      f"{name:<14}{b:>6}{mean_len:>10.0f}{inp1:>11.1f} ex/s{inp:>11.1f} ex/s{tr:>7.2f} ex/s{inp / tr:>7.1f}x"
      f"{comp:>11.1f}{prep:>11.1f}  {sorted(shapes)}"
    )


if __name__ == "__main__":
  app.run(main)
