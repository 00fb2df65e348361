"""A reference rnn_args.yaml (the NEJM 2024 release's, or its TPU variant's) as a b2t_jax config.

Launch: python -m b2t_jax.main --config=configs/reference_yaml.py:PATH/rnn_args.yaml --workdir=DIR \
    [--config.train.num_steps=5000]
(`tools/train_model.py --config_path PATH/rnn_args.yaml` does the same with the YAML's output_dir as DIR.)

Every key of the file is copied to a config field, turned into fields by its own rule, checked, or ignored with a
reason (the table is b2t_jax/reference_args.py; `--config.mode=summary` prints it for the file); an unknown key
is an error naming it. Fields the file does not set keep configs/default.py's values; --config overrides apply on
top.
"""

from b2t_jax import reference_args
from configs import default


def get_config(path: str = ""):
  if not path:
    raise reference_args.ReferenceArgsError(
      "configs/reference_yaml.py needs the YAML after a colon: --config=configs/reference_yaml.py:PATH/rnn_args.yaml"
    )
  return reference_args.config_from_yaml(path, default.get_config())
