"""Times the jitted train step of a config on one fixed batch and prints one JSON line of figures.

  python tools/benchmark.py --config=configs/gru_baseline.py --config.data.batch_size=8 --time_bins=500 --steps=10

Reports compile time, median / p90 step time, steps/s, trials/s, model FLOPs per step (analytic, SPEC §7, with
XLA's own cost analysis beside it), achieved FLOP/s, MFU and peak memory. MFU is against the platform peak: on
CPU a dense fp32 matmul measured in the same process before and after the timed steps (so both numbers see the
same cores and clock; the larger probe is used), on TPU/GPU the vendor's dense peak for the compute dtype from
`PEAK_FLOPS` below. The load average before and after, and the share of the cores that other processes used
(or the hypervisor stole) during the run, are recorded, and a busy machine is warned about (tools/benchlib.py).
"""

import json
import os
import resource
import time

import benchlib  # tools/ is the script's own folder
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

from b2t_jax import experiment, losses, sharding, steps, summary
from b2t_jax.data.augment import preprocess
from b2t_jax.models.cell import matmul, project_inputs
from b2t_jax.models.gru import gru_recurrence
from b2t_jax.patching import n_patches

_CONFIG = config_flags.DEFINE_config_file("config", "configs/gru_baseline.py", "config file")
_T = flags.DEFINE_integer("time_bins", 500, "trial length in 20 ms bins (every trial of the batch)")
_STEPS = flags.DEFINE_integer("steps", 10, "timed steps")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps after compilation")
_LABEL_LEN = flags.DEFINE_integer("label_len", 30, "phonemes per trial in the synthetic batch")
_MATMUL_N = flags.DEFINE_integer("matmul_n", 2048, "size of the square fp32 matmul that measures the CPU peak")
_TAG = flags.DEFINE_string("tag", "", "free-form label copied into the JSON line")
_PHASES = flags.DEFINE_bool(
  "phases", False, "also time the step's phases (augment, forward, CTC, backward, optimizer, GRU recurrences) apart"
)
_ROUNDS = flags.DEFINE_integer("phase_rounds", 5, "--phases: round-robin rounds (median per phase)")
_BUSY_LOAD = flags.DEFINE_float(
  "busy_load",
  benchlib.DEFAULT_BUSY_LOAD,
  "without /proc/stat: warn (and set quiet=false) when the 1-minute load average exceeds this at start",
)
_BUSY_SHARE = flags.DEFINE_float(
  "busy_share",
  benchlib.DEFAULT_BUSY_SHARE,
  "warn (and set quiet=false) when other processes and the hypervisor took more of the cores' time during the run",
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


def _elapsed_ms(fn, args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return 1e3 * (time.perf_counter() - t0)


def phase_times(exp: experiment.Experiment, state, batch, rounds: int) -> dict[str, float]:
  """Median ms of the train step's parts, each jitted alone on the benchmark's batch and timed round-robin
  (every part sees the same machine load): augment+smoothing, the model's forward, forward+CTC, forward+CTC+
  backward, the optimizer update, the GRU stack's recurrences alone (forward; forward+backward), the same
  loops with nothing but each step's recurrent matmul and a sum of its gates (what the gate math around it
  costs) and the input projections (forward; forward+backward). The differences give the CTC and backward
  shares."""
  cfg = exp.config
  key = jax.random.PRNGKey(0)
  lam = steps.grl_lambda(cfg, state.step)

  def pre(batch):
    return preprocess(key, batch["features"], batch["n_time_steps"], cfg.aug)

  pre = jax.jit(pre)
  x, lengths = pre(batch)
  input_lens = n_patches(lengths, cfg.model.patch_size, cfg.model.patch_stride)

  def forward(params, x):
    return exp.model.apply(
      {"params": params}, x, batch["day"], train=True, mode="full", grl_lambda=lam, rngs={"dropout": key}
    )

  def loss(params, x):
    return losses.decoder_loss(
      forward(params, x),
      input_lens,
      batch["labels"],
      batch["label_lens"],
      batch["weight"],
      noisy_weight=cfg.loss.noisy_weight,
      noise_l2_weight=cfg.loss.noise_l2_weight,
      intermediate_weight=cfg.loss.intermediate_ctc_weight,
      phoneme_weight=cfg.loss.phoneme_ctc_weight,
      marginal_weight=cfg.loss.marginal_ctc_weight,
    )[0]

  grad = jax.jit(jax.grad(loss))
  grads = grad(state.params, x)

  def optimizer(grads, opt_state, params):
    updates, opt_state = exp.tx.update(grads, opt_state, params, day_present=steps.days_present(batch, cfg))
    return optax.apply_updates(params, updates), opt_state

  parts = {
    "augment_smooth": (pre, (batch,)),
    "forward": (jax.jit(forward), (state.params, x)),
    "forward_ctc": (jax.jit(loss), (state.params, x)),
    "forward_ctc_backward": (grad, (state.params, x)),
    "optimizer": (jax.jit(optimizer), (grads, state.opt_state, state.params)),
  }
  gru = _gru_layers(state.params) if cfg.model.encoder == "gru" else []
  if gru:
    b, t = batch["features"].shape[:2]
    p = int(n_patches(jnp.asarray(t), cfg.model.patch_size, cfg.model.patch_stride))
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(cfg.model.dtype)
    xs = [jnp.asarray(rng.standard_normal((b, p, w["w_ih"].shape[0])), jnp.float32) for w in gru]
    xps = [jnp.asarray(rng.standard_normal((b, p, 3, w["w_hh"].shape[0])), jnp.float32) for w in gru]
    h0 = jnp.zeros((b, gru[0]["w_hh"].shape[0]), jnp.float32)

    def rec(ws, xps):
      return [gru_recurrence(xp, h0, w["w_hh"], w["b_hh"], dtype, cfg.model.gru_unroll) for w, xp in zip(ws, xps)]

    def step_matmuls(ws, xps):
      # The recurrence's loop with only h @ W_h per step (the sum of its gates feeds the next step, so the whole
      # product is live and the chain of matmuls is as sequential as the GRU's).
      def one(w, xp):
        def step(h, xp_t):
          hp = matmul("bi,igh->bgh", h, w["w_hh"], dtype) + w["b_hh"] + xp_t  # all three gates stay live
          h = hp[:, 0] + hp[:, 1] + hp[:, 2]
          return h, h

        ys = jax.lax.scan(step, h0, jnp.swapaxes(xp, 0, 1), unroll=cfg.model.gru_unroll)[1]
        return jnp.swapaxes(ys, 0, 1).astype(dtype)

      return [one(w, xp) for w, xp in zip(ws, xps)]

    def proj(ws, xs):
      return [project_inputs(x, w["w_ih"], w["b_ih"], dtype) for w, x in zip(ws, xs)]

    def summed(fn):
      return lambda ws, xs: sum(jnp.sum(y * 1e-3) for y in fn(ws, xs))

    parts["gru_recurrences_forward"] = (jax.jit(rec), (gru, xps))
    parts["gru_recurrences_forward_backward"] = (jax.jit(jax.grad(summed(rec), argnums=(0, 1))), (gru, xps))
    parts["gru_step_matmuls_only_forward"] = (jax.jit(step_matmuls), (gru, xps))
    parts["gru_input_projections_forward"] = (jax.jit(proj), (gru, xs))
    parts["gru_input_projections_forward_backward"] = (jax.jit(jax.grad(summed(proj), argnums=(0, 1))), (gru, xs))
  for fn, args in parts.values():
    jax.block_until_ready(fn(*args))  # compile and warm up
  out = {name: [] for name in parts}
  for _ in range(rounds):
    for name, (fn, args) in parts.items():
      out[name].append(_elapsed_ms(fn, args))
  med = {name: round(float(np.median(v)), 2) for name, v in out.items()}
  med["ctc_share"] = round(med["forward_ctc"] - med["forward"], 2)
  med["backward_share"] = round(med["forward_ctc_backward"] - med["forward_ctc"], 2)
  return med


def _gru_layers(params) -> list[dict]:
  """The baseline GRU stack's per-layer weights ({w_ih, b_ih, w_hh, b_hh}), or [] for other models."""
  stack = params.get("gru") if isinstance(params, dict) else None
  if not stack:
    return []
  layers = sorted((k for k in stack if k.startswith("layer_")), key=lambda k: int(k.split("_")[1]))
  return [{**{k: stack[n][k] for k in ("w_ih", "b_ih")}, **stack[n]["cell"]} for n in layers]


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

  # Others' share is judged over the figures' window (both peak probes, the timed steps, the phases), not over
  # the build and compile before it, which would dilute a stranger who ran only while we timed.
  cpu_before = benchlib.cpu_snapshot()
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

  phases = phase_times(exp, state, batch, _ROUNDS.value) if _PHASES.value else None
  flops = summary.train_step_flops(config, gb, t)
  step_s, figures = benchlib.step_figures(times, gb, flops)
  peak_after, _ = platform_peak(device, config.model.dtype)
  shares = benchlib.others_share(cpu_before, benchlib.cpu_snapshot())
  peak, peak_fields = benchlib.peak_report(peak_before, peak_after)
  load = benchlib.load_report(load_before, benchlib.load_average(), _BUSY_LOAD.value, shares, _BUSY_SHARE.value)
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
        "encoder": config.model.encoder,
        "n_params": int(sum(np.prod(a.shape) for a in jax.tree.leaves(state.params))),
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
        "mfu": round(flops / step_s / (peak * chips), 6) if peak else None,
        "peak_memory_gib": round(peak_mem / 2**30, 3),
        "memory_source": mem_source,
        "final_loss": round(loss, 4),
        "steps": _STEPS.value,
        **({"phases_ms": phases} if phases else {}),
        **load,
      }
    )
  )


if __name__ == "__main__":
  app.run(main)
