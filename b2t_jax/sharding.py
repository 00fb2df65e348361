"""The device mesh and the shardings of state and batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from flax.core import meta
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "model")


def create_mesh(mesh_shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'model') mesh over all devices; one entry of `mesh_shape` may be -1 (the rest)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(mesh_shape)
  if len(shape) != len(MESH_AXES) or shape.count(-1) > 1:
    raise ValueError(
      f"config.mesh_shape={tuple(mesh_shape)}: give {len(MESH_AXES)} sizes for {MESH_AXES}, at most one of them -1"
    )
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"config.mesh_shape={tuple(mesh_shape)} does not divide the {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(
      f"config.mesh_shape={tuple(mesh_shape)} -> {tuple(shape)} needs {int(np.prod(shape))} "
      f"devices, {len(devices)} are available"
    )
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (trial) axis split over 'data', everything else replicated."""
  return NamedSharding(mesh, P("data"))


def logical_specs(abstract_tree: Any) -> Any:
  """The logical PartitionSpec of every leaf of a (boxed) tree: a box's axis names (`nn.with_logical_partitioning`),
  P() for unannotated leaves (step, keys, counters), and an empty box (what optax.masked leaves where a
  transform does not apply) stays an empty node, so the result has the structure of `nn.unbox(abstract_tree)`."""

  def spec(x):
    if isinstance(x, meta.AxisMetadata):
      return x.get_partition_spec() if jax.tree.leaves(x.unbox()) else x.unbox()
    return P()

  return jax.tree.map(spec, abstract_tree, is_leaf=meta.is_axis_metadata)


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, str | None]]) -> Any:
  """NamedShardings of a boxed tree (params, or a whole train state whose optimizer moments were initialised
  from boxed params and so carry their parameter's axis names), its logical axes mapped to mesh axes by
  `rules` (config.logical_axis_rules)."""
  return nn.logical_to_mesh_sharding(logical_specs(abstract_tree), mesh, [tuple(r) for r in rules])


def fsdp_shardings(shardings: Any, shapes: Any, mesh: Mesh, min_size: int, axis: str = "data") -> Any:
  """Fully sharded data parallelism (config.fsdp): each array of at least `min_size` elements is also split over
  the `axis` mesh axis, along its largest dimension that the rules left unsharded and that the axis size
  divides. Under jit, XLA then all-gathers a parameter where the forward needs it whole and reduce-scatters
  its gradient, so parameters and optimizer moments are stored once across the data axis instead of on every
  device. Arrays already split over `axis`, and those with no such dimension, keep their sharding."""
  n = mesh.shape[axis]

  def one(s: NamedSharding, shape) -> NamedSharding:
    dims = tuple(shape.shape)
    if n == 1 or int(np.prod(dims, dtype=np.int64)) < min_size:
      return s
    spec = list(s.spec) + [None] * (len(dims) - len(s.spec))
    used = {a for entry in spec if entry is not None for a in (entry if isinstance(entry, tuple) else (entry,))}
    free = [i for i, d in enumerate(dims) if spec[i] is None and d % n == 0]
    if axis in used or not free:
      return s
    spec[max(free, key=lambda i: dims[i])] = axis
    return NamedSharding(mesh, P(*spec))

  return jax.tree.map(one, shardings, shapes)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Places this process's rows of a batch onto the mesh as global arrays sharded over 'data'."""
  n_data = mesh.shape["data"]
  local_rows = next(iter(batch.values())).shape[0]
  global_rows = local_rows * jax.process_count()
  if global_rows % n_data:
    raise ValueError(
      f"a batch of {global_rows} trials does not divide the {n_data} devices of the 'data' mesh "
      "axis; make config.data.batch_size / eval_batch_size (divided by grad_accum_steps) a "
      f"multiple of {n_data}"
    )
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def to_host(tree: Any) -> Any:
  """Fetches (possibly multi-host) global arrays to numpy on every process."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)
