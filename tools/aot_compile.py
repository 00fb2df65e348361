"""Does this config fit on that TPU slice? The TPU compiler's answer, on a machine without a TPU.

Builds the config's real mesh, shardings and jitted train, eval and streaming steps for a named TPU topology from
abstract shapes (no parameter is materialised), compiles them with the TPU compiler (libtpu: `pip install -e
'.[tpu]'`, which `make setup` does) and prints, per chip: argument, output, temporary and code bytes against the
chip's HBM, the compile time, and the step's FLOPs and bytes accessed. The last line of stdout is one JSON object
(`arg_bytes`, `per_chip_bytes`, `hbm_bytes`, `fits`, `step_lower_bound_s`, per-step figures). Exit 1, with the
shortfall and the levers on stderr, when a step does not fit (or the compiler refuses it: RESOURCE_EXHAUSTED).

  python tools/aot_compile.py --config=configs/tpu_v4.py --topology=v4-8 [--time_bins=768] [--config.fsdp=True]
  python tools/aot_compile.py --table=aot.jsonl     # the README table of collected JSON lines (compiles nothing)

Topologies: v4-8, v4-16, v4-32, v5e-4, v5e-8, v5e-16, v5p-8, v5p-16, v6e-8 (Cloud TPU accelerator types), or a
raw topology such as v5e:2x2. The full tpu_v4 train step takes minutes to compile on a small CPU; progress is
printed to stderr every --progress_s seconds.
"""

import json
import os
import sys

# The steps are compiled for the named TPU topology, never run: JAX itself stays on the CPU (also on a TPU VM).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from b2t_jax import aot, config_check  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tpu_v4.py", "config file (any --config.x=v override)")
_TOPOLOGY = flags.DEFINE_string("topology", "v4-8", f"TPU slice: {', '.join(aot.TOPOLOGIES)}, or e.g. v5e:2x2")
_T = flags.DEFINE_integer("time_bins", 768, "padded trial length in 20 ms bins for the train and eval steps")
_STEPS = flags.DEFINE_list("steps", list(aot.STEPS), "steps to compile: train, eval, stream")
_HBM = flags.DEFINE_float("hbm_gib", 0.0, "HBM budget per chip in GiB (0 = the chip's; lower it to keep headroom)")
_PROGRESS = flags.DEFINE_float("progress_s", 30.0, "seconds between 'still compiling' lines (0 = none)")
_TABLE = flags.DEFINE_string("table", "", "compile nothing: print the README table of a file of this tool's JSON lines")


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if _TABLE.value:
    with open(_TABLE.value) as f:
      print(aot.markdown_table([json.loads(line) for line in f if line.strip().startswith("{")]))
    return 0
  config = _CONFIG.value
  try:
    report = aot.compile_for_topology(config, _TOPOLOGY.value, _T.value, _STEPS.value, _PROGRESS.value)
    summary = aot.summarize(report, int(_HBM.value * aot.GIB) or None)
  except (ValueError, RuntimeError, config_check.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  summary["config"] = os.path.basename(flags.FLAGS["config"].config_filename)
  summary["fsdp"] = bool(config.fsdp)
  summary["encoder"] = config.model.encoder
  summary["batch"] = config.data.batch_size
  summary["grad_accum"] = config.optim.grad_accum_steps
  summary["dtype"] = config.model.dtype
  gib = aot.GIB
  print(
    f"{summary['config']} ({summary['encoder']}) on {summary['topology']} ({summary['chips']} x "
    f"{summary['device_kind']}, mesh "
    f"{tuple(summary['mesh'])}, fsdp {summary['fsdp']}, batch {summary['batch']} / accum {summary['grad_accum']}, "
    f"{_T.value} bins), per chip, HBM {summary['hbm_bytes'] / gib:.2f} GiB:"
  )
  print(
    f"{'step':<8}{'args GiB':>10}{'out GiB':>9}{'alias':>8}{'temp GiB':>10}{'code MiB':>10}{'total GiB':>11}"
    f"{'TFLOP':>9}{'GiB accessed':>14}{'compile s':>11}"
  )
  for name, s in summary["steps"].items():
    if s["compiled"]:
      print(
        f"{name:<8}{s['argument'] / gib:>10.2f}{s['output'] / gib:>9.2f}{s['alias'] / gib:>8.2f}"
        f"{s['temp'] / gib:>10.2f}"
        f"{s['code'] / 2**20:>10.1f}{s['per_chip_bytes'] / gib:>11.2f}{(s['flops'] or 0) / 1e12:>9.3f}"
        f"{(s['bytes_accessed'] or 0) / gib:>14.2f}{s['seconds']:>11.1f}"
      )
    else:
      print(f"{name:<8}{s['arg_bytes'] / gib:>10.2f}  refused by the TPU compiler: {s['error']}")
  if summary["step_lower_bound_s"]:
    print(
      f"train step >= {summary['step_lower_bound_s'] * 1e3:.1f} ms on this slice: "
      f"{summary['model_flops_per_chip'] / 1e12:.2f} TFLOP of model matmuls per chip at the bf16 peak (XLA's "
      "TFLOP above count each loop body once, so they miss most of a recurrence's steps)"
    )
  print(json.dumps(summary), flush=True)
  if not summary["fits"]:
    print(f"error: {aot.shortfall(summary)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
