"""Per-chunk latency of streaming inference (b2t_jax.decoding.streaming) on this machine.

  python tools/benchmark_streaming.py                                  # full-size gru model, 80 ms chunks
  python tools/benchmark_streaming.py --config.stream.chunk_bins=8     # any config field can be overridden
  python tools/benchmark_streaming.py --config=WORKDIR/config.py --workdir=WORKDIR   # a trained / imported model

Times `feed()` of one chunk (host -> device, the jitted step, logits back to the host), after a warm-up that
covers compilation. A real-time BCI needs each chunk processed in less than the chunk's duration. Then streams
--offline_trials whole random trials of --offline_bins bins and prints the largest difference between the streamed
logit rows and the offline eval-mode forward pass of the same trial (steps.ensemble_logits, as mode=infer runs it).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import linen as nn
from ml_collections import config_flags

from b2t_jax import steps
from b2t_jax.data.batching import pool_features
from b2t_jax.decoding.streaming import StreamingDecoder
from b2t_jax.models import create_model

BIN_MS = 20.0  # duration of one t15 bin

_CONFIG = config_flags.DEFINE_config_file(
  "config", "configs/default.py", "config of the model to time (default: the full-size gru baseline)"
)
_WORKDIR = flags.DEFINE_string(
  "workdir",
  None,
  "restore params from this workdir's best/latest checkpoint "
  "(default: random params of the config's shapes, which time the same)",
)
_CHUNKS = flags.DEFINE_integer("chunks", 500, "timed chunks")
_WARMUP = flags.DEFINE_integer("warmup", 20, "untimed chunks first (compilation, caches)")
_DAY = flags.DEFINE_integer("day", 0, "day index whose day layer is used")
_OFFLINE_TRIALS = flags.DEFINE_integer("offline_trials", 2, "whole trials streamed and compared with the offline pass")
_OFFLINE_BINS = flags.DEFINE_integer("offline_bins", 500, "bins per compared trial")


def _params(config):
  if _WORKDIR.value:
    from b2t_jax import checkpoint as ckpt_lib  # noqa: PLC0415 - orbax only when restoring
    from b2t_jax.experiment import Experiment  # noqa: PLC0415

    exp = Experiment(config)
    ckpts = ckpt_lib.Checkpoints(_WORKDIR.value)
    state = ckpts.restore(exp.abstract_state(), "best") or ckpts.restore(exp.abstract_state(), "latest")
    ckpts.close()
    if state is None:
      raise app.UsageError(f"no checkpoint under {_WORKDIR.value}/best or /checkpoints")
    return state.params
  model = create_model(config)
  x = jnp.zeros((1, config.model.patch_size, config.data.n_features // config.data.feature_pool))
  return nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(config.seed), x, jnp.zeros((1,), jnp.int32))["params"])


def offline_max_diff(config, params, decoder: StreamingDecoder, rng: np.random.Generator) -> float:
  """Largest |streamed - offline| logit over --offline_trials random trials fed in chunks of the decoder's size."""
  fn = jax.jit(lambda p, b: steps.ensemble_logits(p, b, model=decoder.model, config=config)[0])
  worst = 0.0
  for _ in range(_OFFLINE_TRIALS.value):
    raw = rng.normal(size=(_OFFLINE_BINS.value, config.data.n_features)).astype(np.float32)
    rows = [decoder.feed(raw[i : i + decoder.geo.chunk]) for i in range(0, len(raw), decoder.geo.chunk)]
    streamed = np.concatenate([*rows, decoder.finish()])
    batch = {
      "features": pool_features(raw, config.data.feature_pool)[None],
      "n_time_steps": np.asarray([len(raw)], np.int32),
      "day": np.asarray([_DAY.value], np.int32),
    }
    offline = np.asarray(fn(params, batch))[0]
    if offline.shape != streamed.shape:
      raise SystemExit(f"streamed rows {streamed.shape} and offline logits {offline.shape} differ in shape")
    worst = max(worst, float(np.abs(streamed - offline).max()))
  return worst


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  params = _params(config)
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
  decoder = StreamingDecoder(config, params, _DAY.value)
  chunk = decoder.geo.chunk
  rng = np.random.default_rng(0)
  bins = rng.normal(size=(_WARMUP.value + _CHUNKS.value, chunk, config.data.n_features)).astype(np.float32)
  times, rows = [], 0
  for i, b in enumerate(bins):
    t0 = time.perf_counter()
    rows += decoder.feed(b).shape[0]
    if i >= _WARMUP.value:
      times.append(time.perf_counter() - t0)
  ms = np.asarray(times) * 1e3
  budget = chunk * BIN_MS
  print(
    f"model {config.model.kind} ({n_params:,} params, dtype {config.model.dtype}) on "
    f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind}), {os.cpu_count()} CPUs visible"
  )
  print(
    f"chunk {chunk} bins = {budget:.0f} ms of signal, {decoder.geo.slots} patch(es) per chunk, "
    f"{len(ms)} timed chunks, {rows} logit rows emitted"
  )
  print(
    f"per-chunk latency: median {np.median(ms):.2f} ms, p90 {np.percentile(ms, 90):.2f} ms, "
    f"p99 {np.percentile(ms, 99):.2f} ms, max {ms.max():.2f} ms  "
    f"(real-time budget {budget:.0f} ms: {'met' if np.percentile(ms, 99) < budget else 'NOT met'} at p99)"
  )
  if _OFFLINE_TRIALS.value > 0:
    decoder.reset()
    diff = offline_max_diff(config, params, decoder, rng)
    print(
      f"streamed vs offline logits: max |diff| {diff:.1e} over {_OFFLINE_TRIALS.value} trial(s) of "
      f"{_OFFLINE_BINS.value} bins (dtype {config.model.dtype})"
    )


if __name__ == "__main__":
  app.run(main)
