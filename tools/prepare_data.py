"""Prepares the TFDS (ArrayRecord) dataset of a t15 HDF5 tree, with a progress bar; training then reads it by
random access. DATA_DIR may be local or gs://; pass it as --config.data.data_dir.

python tools/prepare_data.py --hdf5_dir=.../hdf5_data_final --data_dir=DIR [--config=configs/NAME.py]
  [--config.data.on_bad_trial=skip] [--overwrite]

A dataset already in DIR is reused when it was built from the same HDF5 files (relative paths, sizes, mtimes)
and options (sessions, n_features, on_bad_trial); otherwise the tool stops naming what differs, and
--overwrite deletes and rebuilds it.
"""

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from b2t_jax.data import prepare, t15, tfds_b2t

_HDF5 = flags.DEFINE_string("hdf5_dir", None, "the hdf5_data_final root (session folders)", required=True)
_DATA = flags.DEFINE_string("data_dir", None, "TFDS data dir to write (local or gs://)", required=True)
_CONFIG = config_flags.DEFINE_config_file(
  "config",
  os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.py"),
  "config whose data.sessions / n_features / on_bad_trial the dataset is built with",
)
_OVERWRITE = flags.DEFINE_bool(
  "overwrite",
  False,
  "rebuild a dataset in --data_dir that was built from other "
  "HDF5 files or options (without it the tool stops, naming the difference)",
)


def main(argv):
  del argv
  d = _CONFIG.value.data
  try:
    out = tfds_b2t.prepare(
      _HDF5.value,
      _DATA.value,
      sessions=d.sessions,
      n_features=d.n_features,
      on_bad_trial=d.on_bad_trial,
      overwrite=_OVERWRITE.value,
    )
  except t15.DataError as e:  # its message names the file/field and what to do: no traceback needed
    sys.exit(f"prepare_data.py: {e}")
  import tensorflow_datasets as tfds

  info = tfds.builder_from_directory(out).info
  counts = {name: s.num_examples for name, s in info.splits.items()}
  print(f"skipped: {json.dumps(info.metadata.get('skipped', {}), sort_keys=True)}")
  print(f"prepared {counts} in {out}; train with --config.data.data_dir={_DATA.value}")
  assert prepare.find_dataset_dir(_DATA.value) == out


if __name__ == "__main__":
  app.run(main)
