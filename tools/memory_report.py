"""Per-device memory of a config's compiled train step on several meshes, from XLA's memory analysis.

Compiles against abstract inputs (nothing is allocated), so the full tpu_v4 model fits on a laptop:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tools/memory_report.py \\
      --config=configs/tpu_v4.py --meshes=8x1,4x2 --time_bins=768 --fsdp=false,true
Prints one JSON line per mesh and fsdp setting (config.fsdp: parameters and optimizer moments also split over
'data'), with the bytes of the train state per device beside the step's total. Numbers come from the CPU
compiler; a TPU compile differs in layout and fusion but not in what is stored (parameters, optimizer state,
activations kept for the backward pass).
"""

import json
import os
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from b2t_jax import experiment
from b2t_jax.sharding import create_mesh

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tpu_v4.py", "config file")
_MESHES = flags.DEFINE_list("meshes", ["8x1", "4x2"], "data x model mesh shapes")
_T = flags.DEFINE_integer("time_bins", 768, "padded trial length in 20 ms bins")
_FSDP = flags.DEFINE_list("fsdp", ["false"], "config.fsdp settings to compile, e.g. false,true")

GIB = 1024**3


def main(argv):
  del argv
  config = _CONFIG.value
  bad = [v for v in _FSDP.value if v.lower() not in ("true", "false")]
  if bad:
    raise app.UsageError(f"--fsdp={','.join(_FSDP.value)}: each setting must be true or false, not {bad[0]!r}")
  for mesh_str in _MESHES.value:
    shape = tuple(int(v) for v in mesh_str.split("x"))
    for fsdp in _FSDP.value:
      config.fsdp = fsdp.lower() == "true"
      report(config, shape)


def state_bytes_per_device(exp: experiment.Experiment) -> int:
  """Bytes of the train state one device holds: each array's size over the devices it is split across."""
  total = 0
  for a in jax.tree.leaves(exp.abstract_state()):
    shard = a.sharding.shard_shape(a.shape)
    total += int(np.prod(shard, dtype=np.int64)) * a.dtype.itemsize
  return total


def report(config, shape: tuple[int, ...]) -> None:
  t0 = time.time()
  exp = experiment.Experiment(config, mesh=create_mesh(shape))
  compiled = exp.train_step.lower(exp.abstract_state(), exp.example_batch(config.data.batch_size, _T.value)).compile()
  m = compiled.memory_analysis()
  total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  state = state_bytes_per_device(exp)
  print(
    json.dumps(
      {
        "config": os.path.basename(flags.FLAGS["config"].config_filename),
        "mesh": shape,
        "fsdp": config.fsdp,
        "batch": config.data.batch_size,
        "grad_accum": config.optim.grad_accum_steps,
        "micro_batch_per_data_shard": config.data.batch_size // config.optim.grad_accum_steps // shape[0],
        "time_bins": _T.value,
        "dtype": config.model.dtype,
        "state_gib": round(state / GIB, 2),
        "state_bytes": state,
        "arguments_gib": round(m.argument_size_in_bytes / GIB, 2),
        "temp_gib": round(m.temp_size_in_bytes / GIB, 2),
        "output_gib": round(m.output_size_in_bytes / GIB, 2),
        "aliased_gib": round(m.alias_size_in_bytes / GIB, 2),
        "per_device_total_gib": round(total / GIB, 2),
        "per_device_total_bytes": total,
        "compile_s": round(time.time() - t0, 1),
      }
    ),
    flush=True,
  )


if __name__ == "__main__":
  app.run(main)
