"""Can a recipe memorise one batch? Trains on training batch 0 only and prints its greedy PER as it goes.

  python tools/overfit_batch.py --config=configs/demo.py --config.data.data_dir=/tmp/b2t_demo/tfds \
      --config.model.kind=gru --config.model.targets=diphone --steps=300

The standard first check of a new objective or head: a correct one drives the PER of a batch it sees at every step
towards 0; a fault in its labels, its loss or its decoding keeps it near chance (1.0) however long it trains. It
uses the config's model, optimizer and learning-rate schedule (warm-up included) on one device; the batch is the
one training would draw first (`pipeline.train_batch_indices(split, config, 0)`); the config's augmentation and
dropout still act inside each step, as in training (set them to 0 to see pure memorisation).
Every `--every` steps a line `step N  per P  loss L  S s`; the last line is one JSON object with the PER curve.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _define_flags() -> None:
  """The command's flags, defined only when it runs as a script: importing `overfit` leaves absl's FLAGS alone."""
  config_flags.DEFINE_config_file("config", None, "config file (any --config.x=v override)")
  flags.DEFINE_integer("steps", 300, "training steps on the one batch")
  flags.DEFINE_integer("every", 50, "steps between PER lines")
  flags.DEFINE_string("workdir", "", "scratch folder for the prepared data's cache (default: a temp dir)")


def overfit(config, steps: int, every: int, workdir: str) -> dict:
  """Trains `steps` steps on training batch 0 of `config`'s data -> {'per': [(step, PER)], 'losses': the training
  loss of every step (on that batch, before the step's update), 'seconds'}."""
  import jax

  from b2t_jax import evaluation, experiment, sharding
  from b2t_jax.data import pipeline

  exp = experiment.Experiment(config, mesh=sharding.create_mesh((1, 1), jax.devices()[:1]))
  split = experiment.open_data(config, workdir, ("train",))["train"]
  idx = pipeline.train_batch_indices(split, config, 0)
  device_batch = sharding.shard_batch(pipeline.train_host_batch(split, config, 0), exp.mesh)
  # the PER of those trials as evaluation measures every PER (greedy, real rows only), in eval-size batches
  size = config.data.eval_batch_size
  plan = [idx[i : i + size] for i in range(0, len(idx), size)]
  state, curve, losses, t0 = exp.init_state(), [], [], time.time()
  for k in range(steps + 1):
    if k % every == 0 or k == steps:
      curve.append((k, evaluation.evaluate(exp, state.params, split, plan)["val_per"]))
      loss = f"{losses[-1]:.3f}" if losses else "-"
      print(f"step {k}  per {curve[-1][1]:.3f}  loss {loss}  {time.time() - t0:.0f} s", flush=True)
    if k < steps:
      state, m = exp.train_step(state, device_batch)
      losses.append(float(m["loss"]))
  return {"per": curve, "losses": losses, "seconds": round(time.time() - t0, 1)}


def main(argv) -> None:
  del argv
  from b2t_jax import config_check

  f = flags.FLAGS
  config = f.config
  config_check.validate(config)
  workdir = f.workdir or tempfile.mkdtemp(prefix="b2t_overfit_")
  result = overfit(config, f.steps, f.every, workdir)
  result.update(kind=config.model.kind, encoder=config.model.encoder, targets=config.model.targets)
  print(json.dumps(result))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
