"""Times the jitted train step of a config on one fixed batch and prints one JSON line of figures.

  python tools/benchmark.py --config=configs/gru_baseline.py --config.data.batch_size=8 --time_bins=500 --steps=10

Reports compile time, median / p90 step time, steps/s, trials/s, model FLOPs per step (analytic, SPEC §7, with
XLA's own cost analysis beside it), achieved FLOP/s, MFU and peak memory. MFU is against the platform peak: on
CPU a dense fp32 matmul measured in the same process before and after the timed steps (so both numbers see the
same cores and clock; the larger probe is used), on TPU/GPU the vendor's dense peak for the compute dtype from
`PEAK_FLOPS` below. The load average before and after is recorded, and a busy machine is warned about
(tools/benchlib.py).
"""

import json
import os
import resource
import time

import benchlib  # tools/ is the script's own folder
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from b2t_jax import experiment, sharding, summary

_CONFIG = config_flags.DEFINE_config_file("config", "configs/gru_baseline.py", "config file")
_T = flags.DEFINE_integer("time_bins", 500, "trial length in 20 ms bins (every trial of the batch)")
_STEPS = flags.DEFINE_integer("steps", 10, "timed steps")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps after compilation")
_LABEL_LEN = flags.DEFINE_integer("label_len", 30, "phonemes per trial in the synthetic batch")
_MATMUL_N = flags.DEFINE_integer("matmul_n", 2048, "size of the square fp32 matmul that measures the CPU peak")
_TAG = flags.DEFINE_string("tag", "", "free-form label copied into the JSON line")
_BUSY_LOAD = flags.DEFINE_float(
  "busy_load",
  benchlib.DEFAULT_BUSY_LOAD,
  "warn (and set quiet=false) when the 1-minute load average exceeds this at start",
)

# Dense peak FLOP/s per chip by (device_kind substring, compute dtype), from the vendors' data sheets.
PEAK_FLOPS = {
  ("TPU v4", "bfloat16"): 275e12,
  ("TPU v4", "float32"): 275e12 / 2,
  ("TPU v5 lite", "bfloat16"): 197e12,
  ("TPU v5e", "bfloat16"): 197e12,
  ("TPU v5p", "bfloat16"): 459e12,
  ("TPU v6", "bfloat16"): 918e12,
  # GPU float32: TF32 tensor-core peaks, since JAX runs fp32 matmuls in TF32 on these GPUs by default.
  ("H100", "bfloat16"): 989e12,
  ("H100", "float32"): 494e12,
  ("H200", "bfloat16"): 989e12,
  ("H200", "float32"): 494e12,
  ("A100", "bfloat16"): 312e12,
  ("A100", "float32"): 156e12,
}


def measure_matmul_peak(n: int, repeats: int = 5) -> float:
  """FLOP/s of a jitted (n, n) x (n, n) fp32 matmul, best of `repeats` (the attainable dense peak)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, a).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n**3 / min(times)


def platform_peak(device, dtype: str) -> tuple[float | None, str]:
  if device.platform == "cpu":
    return measure_matmul_peak(_MATMUL_N.value), f"measured fp32 {_MATMUL_N.value}^3 matmul"
  for (kind, dt), peak in PEAK_FLOPS.items():
    if kind in device.device_kind and dt == dtype:
      return peak, f"data sheet {kind} {dt}"
  return None, f"no peak known for {device.device_kind} {dtype}"


def synthetic_batch(exp: experiment.Experiment, batch: int, t: int, label_len: int) -> dict[str, np.ndarray]:
  """A fixed, feasible batch of the config's shapes: every trial `t` bins, `label_len` phonemes."""
  rng = np.random.default_rng(0)
  cfg = exp.config
  labels = np.zeros((batch, cfg.data.max_label_len), np.int32)
  labels[:, :label_len] = rng.integers(1, cfg.model.n_classes, (batch, label_len))
  days = np.arange(batch) % min(cfg.data.days_per_batch, len(cfg.data.sessions))
  return {
    "features": rng.standard_normal((batch, t, exp.n_features)).astype(np.float32),
    "n_time_steps": np.full((batch,), t, np.int32),
    "labels": labels,
    "label_lens": np.full((batch,), label_len, np.int32),
    "day": days.astype(np.int32),
    "weight": np.ones((batch,), np.float32),
  }


def main(argv):
  del argv
  load_before = benchlib.load_average()
  config = _CONFIG.value
  device = jax.devices()[0]
  exp = experiment.Experiment(config)
  gb, t = config.data.batch_size, _T.value
  batch = sharding.shard_batch(synthetic_batch(exp, gb, t, _LABEL_LEN.value), exp.mesh)
  state = exp.init_state()

  t0 = time.perf_counter()
  compiled = exp.train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")

  peak_before, peak_source = platform_peak(device, config.model.dtype)
  for _ in range(_WARMUP.value):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(_STEPS.value):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  loss = float(metrics["loss"])

  flops = summary.train_step_flops(config, gb, t)
  step_s, figures = benchlib.step_figures(times, gb, flops)
  peak_after, _ = platform_peak(device, config.model.dtype)
  peak, peak_fields = benchlib.peak_report(peak_before, peak_after)
  load = benchlib.load_report(load_before, benchlib.load_average(), _BUSY_LOAD.value)
  # The step's FLOPs are spread over every chip of the mesh; a data-sheet peak is one chip's, the CPU matmul
  # peak already uses every core (simulated CPU devices share them).
  chips = 1 if device.platform == "cpu" else jax.device_count()
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    peak_mem, mem_source = stats["peak_bytes_in_use"], "device peak_bytes_in_use"
  else:
    peak_mem, mem_source = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"
  print(
    json.dumps(
      {
        "tool": "b2t_jax",
        "tag": _TAG.value,
        "config": os.path.basename(flags.FLAGS["config"].config_filename),
        "model": config.model.kind,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "n_devices": jax.device_count(),
        "dtype": config.model.dtype,
        "gru_backward": config.model.gru_backward,
        "gru_unroll": config.model.gru_unroll,
        "gru_wavefront": config.model.gru_wavefront,
        "gru_remat": config.model.gru_remat,
        "global_batch": gb,
        "per_device_batch": gb // exp.mesh.shape["data"],
        "time_bins": t,
        "compile_s": round(compile_s, 2),
        **figures,
        "xla_gflops_per_step": round(xla_flops / 1e9, 2),
        "peak_gflops_per_s": round(peak / 1e9, 2) if peak else None,
        "peak_source": peak_source,
        **peak_fields,
        "mfu": round(flops / step_s / (peak * chips), 4) if peak else None,
        "peak_memory_gib": round(peak_mem / 2**30, 3),
        "memory_source": mem_source,
        "final_loss": round(loss, 4),
        "steps": _STEPS.value,
        **load,
      }
    )
  )


if __name__ == "__main__":
  app.run(main)
