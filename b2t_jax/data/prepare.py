"""Resolving `config.data.data_dir` to a prepared TFDS (ArrayRecord) dataset, preparing it when needed.

`config.data.data_dir` may name
  - a TFDS data dir written by tools/prepare_data.py (holding b2t_t15/<version>), or that version folder,
    locally or on gs://;
  - an HDF5 tree (hdf5_data_final layout): it is prepared on first use into a cache folder keyed by the
    tree's contents (relative paths, sizes, mtimes) and the build options, then reused;
  - "" : synthetic HDF5 data is generated into WORKDIR/synthetic_data and prepared next to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid

import jax
import ml_collections
from absl import logging
from etils import epath

from b2t_jax.data import t15, tfds_b2t
from b2t_jax.data.synthetic import make_synthetic_dataset


def find_dataset_dir(path: str) -> str | None:
  """The b2t_t15/<version> folder that `path` is or holds (newest version), else None."""
  if not path:
    return None
  p = epath.Path(path)
  if (p / "dataset_info.json").exists():
    return str(p)
  base = p / tfds_b2t.NAME
  if base.is_dir():
    versions = [v for v in base.iterdir() if (v / "dataset_info.json").exists()]
    if versions:
      return str(max(versions, key=lambda v: tuple(int(x) for x in v.name.split("."))))
  return None


def is_tfds_dir(path: str) -> bool:
  return find_dataset_dir(path) is not None


def tree_key(hdf5_dir: str, options: dict) -> str:
  """A content key of an HDF5 tree: relative paths, sizes and mtimes of its .hdf5 files, plus build options."""
  entries = sorted([rel, *st] for rel, st in tfds_b2t.tree_entries(hdf5_dir).items())
  blob = json.dumps([tfds_b2t.VERSION, options, entries], sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def _build_options(config: ml_collections.ConfigDict) -> dict:
  d = config.data
  return {"sessions": list(d.sessions), "n_features": d.n_features, "on_bad_trial": d.on_bad_trial}


def prepare_atomically(hdf5_dir: str, out_dir: str, options: dict) -> str:
  """Prepares into a private temporary folder, then renames it to `out_dir` (a concurrent preparer loses the
  race harmlessly). Returns the dataset folder."""
  if not is_tfds_dir(out_dir):
    tmp = f"{out_dir}.tmp-{uuid.uuid4().hex[:8]}"
    logging.info("preparing the TFDS dataset of %s into %s", hdf5_dir, out_dir)
    try:
      tfds_b2t.prepare(hdf5_dir, tmp, **options)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)  # leave no half-built folder in the cache
      raise
    try:
      os.rename(tmp, out_dir)
    except OSError:  # someone else finished first
      shutil.rmtree(tmp, ignore_errors=True)
  return find_dataset_dir(out_dir)


def _on_every_process(fn):
  """Process 0 first (a shared filesystem then holds the result for everyone), then the others (a no-op
  there, a local build on hosts that do not share the folder)."""
  if jax.process_index() == 0:
    out = fn()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("b2t_prepare_data")
  if jax.process_index() != 0:
    out = fn()
  return out


def resolve_hdf5_or_tfds(config: ml_collections.ConfigDict, workdir: str) -> str:
  """`config.data.data_dir`, or a synthetic HDF5 tree generated once under the workdir when it is empty."""
  if config.data.data_dir:
    return config.data.data_dir
  out = os.path.join(workdir, "synthetic_data")
  s = config.data.synthetic

  def generate():
    if not os.path.exists(os.path.join(out, ".complete")):
      logging.info("config.data.data_dir is empty: writing synthetic t15 data to %s", out)
      make_synthetic_dataset(
        out,
        config.data.sessions,
        n_sessions=s.n_sessions,
        trials_per_session=s.trials_per_session,
        seed=s.seed,
        noise_std=s.noise_std,
        length_profile=s.length_profile,
      )
      open(os.path.join(out, ".complete"), "w").close()
    return out

  return _on_every_process(generate)


def resolve_dataset(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The prepared TFDS dataset folder for `config.data.data_dir` (see module doc), preparing it if needed."""
  path = resolve_hdf5_or_tfds(config, workdir)
  found = find_dataset_dir(path)
  if found:
    return found
  if not os.path.isdir(path):
    raise t15.DataError(
      f"config.data.data_dir={path!r} is neither a prepared TFDS dataset (tools/prepare_data.py) "
      "nor an existing hdf5_data_final folder"
    )
  options = _build_options(config)
  if not config.data.data_dir:
    out = os.path.join(workdir, "synthetic_tfds")
  else:
    cache = config.data.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "b2t_jax", "tfds")
    os.makedirs(cache, exist_ok=True)
    out = os.path.join(cache, f"{os.path.basename(os.path.normpath(path))}-{tree_key(path, options)}")
  return _on_every_process(lambda: prepare_atomically(path, out, options))
