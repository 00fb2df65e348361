"""The NEJM 2024 baseline GRUDecoder (SPEC §3.3) with the reference training recipe (SPEC §4).

Launch: python -m b2t_jax.main --config=configs/gru_baseline.py --workdir=DIR --config.data.data_dir=.../hdf5_data_final
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model.kind = "gru"
  return c
