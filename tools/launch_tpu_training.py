"""The TPU variant's launcher, kept: trains on all local accelerator cores of one TPU VM from an rnn_args.yaml.

  python tools/launch_tpu_training.py --config rnn_args.yaml --num_cores 8

Checks that this machine has `--num_cores` local accelerator cores (else exits 1, saying so; on a CPU,
XLA_FLAGS=--xla_force_host_platform_device_count=8 simulates 8 of them), then trains as tools/train_model.py does,
data-parallel over the cores (the mesh spans them all): `dataset.batch_size` trials per core x num_cores x
`gradient_accumulation_steps` per optimizer step, as Accelerate counts them (--num_cores replaces the file's
num_tpu_cores). The workdir is the YAML's output_dir. A multi-host pod slice: tools/launch_tpu_pod.sh.
"""

from __future__ import annotations

import argparse
import sys

SIMULATE = "XLA_FLAGS=--xla_force_host_platform_device_count={n}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="rnn_args.yaml", help="the reference's rnn_args.yaml (or its TPU variant)")
  parser.add_argument("--num_cores", type=int, default=8, help="local accelerator cores to train on (all of them)")
  args = parser.parse_args()
  if args.num_cores < 1:
    parser.error(f"--num_cores {args.num_cores}: give the number of local accelerator cores (e.g. 8)")

  import jax  # noqa: PLC0415 - after argparse: --help stays instant
  from absl import app  # noqa: PLC0415

  from b2t_jax import main as b2t_main  # noqa: PLC0415
  from b2t_jax import reference_args  # noqa: PLC0415
  from configs import default  # noqa: PLC0415

  devices = jax.local_devices()
  if len(devices) != args.num_cores:
    kinds = sorted({f"{d.platform} ({d.device_kind})" for d in devices})
    print(
      f"error: --num_cores {args.num_cores} needs {args.num_cores} local accelerator cores; this machine has "
      f"{len(devices)} device(s): {', '.join(kinds)}. On a TPU VM install jax[tpu] (pip install 'jax[tpu]') and give "
      f"the VM's core count; to simulate {args.num_cores} cores on this CPU, run with\n  "
      f"{SIMULATE.format(n=args.num_cores)} python {' '.join(sys.argv)}",
      file=sys.stderr,
    )
    sys.exit(1)
  try:
    config = reference_args.config_from_yaml(args.config, default.get_config(), cores=args.num_cores)
    workdir = reference_args.output_dir(args.config)
  except reference_args.ReferenceArgsError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(
    f"training on {len(devices)} {devices[0].platform} cores: {config.data.batch_size} trials per optimizer step "
    f"in {config.optim.grad_accum_steps} micro-batch(es), into {workdir}",
    flush=True,
  )
  app.run(lambda _: b2t_main.launch(config, workdir), argv=sys.argv[:1])


if __name__ == "__main__":
  main()
