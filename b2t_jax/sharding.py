"""The device mesh and the shardings of state and batches."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "model")


def create_mesh(mesh_shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'model') mesh over all devices; one entry of `mesh_shape` may be -1 (the rest)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(mesh_shape)
  if len(shape) != len(MESH_AXES) or shape.count(-1) > 1:
    raise ValueError(f"config.mesh_shape={tuple(mesh_shape)}: give {len(MESH_AXES)} sizes for {MESH_AXES}, "
                     "at most one of them -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"config.mesh_shape={tuple(mesh_shape)} does not divide the {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"config.mesh_shape={tuple(mesh_shape)} -> {tuple(shape)} needs {int(np.prod(shape))} "
                     f"devices, {len(devices)} are available")
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (trial) axis split over 'data', everything else replicated."""
  return NamedSharding(mesh, P("data"))


def param_shardings(abstract_params: Any, mesh: Mesh, rules: Sequence[tuple[str, str | None]]) -> Any:
  """NamedShardings of the (unboxed) params from their logical axis names (`nn.with_logical_partitioning`)
  mapped to mesh axes by `rules` (config.logical_axis_rules); unannotated params are replicated."""
  specs = nn.get_partition_spec(abstract_params)
  return nn.logical_to_mesh_sharding(specs, mesh, [tuple(r) for r in rules])


def state_shardings(abstract_state: Any, params_sharding: Any, mesh: Mesh) -> Any:
  """Shardings for a whole train state: a leaf whose key path ends with a parameter's path and has that
  parameter's shape (params, Adam moments) takes the parameter's sharding; everything else (step counts,
  keys, per-day counters) is replicated."""
  by_path = {tuple(str(k) for k in path): s
             for path, s in jax.tree_util.tree_flatten_with_path(params_sharding)[0]}
  shapes = {tuple(str(k) for k in path): leaf.shape
            for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]}
  repl = replicated(mesh)

  def pick(path, leaf):
    keys = tuple(str(k) for k in path)
    for n in range(len(keys)):
      tail = keys[n:]
      if tail in by_path and shapes[tail] == leaf.shape:
        return by_path[tail]
    return repl

  return jax.tree_util.tree_map_with_path(pick, abstract_state)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Places this process's rows of a batch onto the mesh as global arrays sharded over 'data'."""
  n_data = mesh.shape["data"]
  local_rows = next(iter(batch.values())).shape[0]
  global_rows = local_rows * jax.process_count()
  if global_rows % n_data:
    raise ValueError(f"a batch of {global_rows} trials does not divide the {n_data} devices of the 'data' mesh "
                     "axis; make config.data.batch_size / eval_batch_size (divided by grad_accum_steps) a "
                     f"multiple of {n_data}")
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def to_host(tree: Any) -> Any:
  """Fetches (possibly multi-host) global arrays to numpy on every process."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)
