"""The TPU variant's training command, kept: trains b2t_jax from a reference rnn_args.yaml.

  python tools/train_model.py --config_path rnn_args.yaml

The workdir is the YAML's `output_dir`; relative paths in the file (output_dir, dataset.dataset_dir) resolve from
the current directory, as the reference's do. Rerunning the command resumes (the reference refuses an existing
output_dir). It is `python -m b2t_jax.main --config=configs/reference_yaml.py:rnn_args.yaml --workdir=OUTPUT_DIR`
(which also takes --config.x.y=v overrides and --config.mode=summary for the key-by-key mapping); both build the
config with b2t_jax/reference_args.py and run it through b2t_jax.main.launch.
"""

from __future__ import annotations

import argparse
import sys


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--config_path", default="rnn_args.yaml", help="the reference's rnn_args.yaml (or its TPU variant)"
  )
  args = parser.parse_args()

  from absl import app  # noqa: PLC0415 - after argparse: --help stays instant

  from b2t_jax import main as b2t_main  # noqa: PLC0415
  from b2t_jax import reference_args  # noqa: PLC0415
  from configs import default  # noqa: PLC0415

  try:
    config = reference_args.config_from_yaml(args.config_path, default.get_config())
    workdir = reference_args.output_dir(args.config_path)
  except reference_args.ReferenceArgsError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  # absl initialises its flags and logging; b2t_jax.main's own flags keep their defaults.
  app.run(lambda _: b2t_main.launch(config, workdir), argv=sys.argv[:1])


if __name__ == "__main__":
  main()
