"""What train, eval, infer and the tools share: the model, optimizer, mesh, train-state shardings, jitted steps
and the opening of the data of one config."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import linen as nn

from b2t_jax import sharding
from b2t_jax.data import pipeline, prepare, t15
from b2t_jax.models import create_model
from b2t_jax.optim import guarded_optimizer
from b2t_jax.steps import TrainState, create_train_state, eval_step, train_step


class Experiment:
  """Model, optimizer, mesh and the jitted steps of one config."""

  def __init__(self, config: ml_collections.ConfigDict, mesh=None):
    self.config = config
    self.model = create_model(config)
    self.tx = guarded_optimizer(config.optim)
    self.mesh = sharding.create_mesh(config.mesh_shape) if mesh is None else mesh
    repl = sharding.replicated(self.mesh)
    data = sharding.batch_sharding(self.mesh)
    # The init is traced once for shapes; its boxes (every parameter's logical axes, which the optimizer's moments
    # inherit) give every leaf's sharding. The arrays themselves are unboxed.
    boxed = jax.eval_shape(self._create_boxed_state)
    self.state_shardings = st = sharding.tree_shardings(boxed, self.mesh, config.logical_axis_rules)
    self._state_shapes = nn.unbox(boxed)
    self.train_step = jax.jit(
      functools.partial(train_step, model=self.model, tx=self.tx, config=config),
      in_shardings=(st, data),
      out_shardings=(st, repl),
      donate_argnums=0,
    )
    self.eval_step = jax.jit(
      functools.partial(eval_step, model=self.model, config=config), in_shardings=(st.params, data), out_shardings=data
    )
    self._init = jax.jit(lambda: nn.unbox(self._create_boxed_state()), out_shardings=st)

  @property
  def n_features(self) -> int:
    return self.config.data.n_features // self.config.data.feature_pool

  def example_batch(self, rows: int, t: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a device batch of `rows` trials padded to `t` bins."""
    return {
      "features": jax.ShapeDtypeStruct((rows, t, self.n_features), jnp.float32),
      "n_time_steps": jax.ShapeDtypeStruct((rows,), jnp.int32),
      "labels": jax.ShapeDtypeStruct((rows, self.config.data.max_label_len), jnp.int32),
      "label_lens": jax.ShapeDtypeStruct((rows,), jnp.int32),
      "day": jax.ShapeDtypeStruct((rows,), jnp.int32),
      "weight": jax.ShapeDtypeStruct((rows,), jnp.float32),
    }

  @property
  def param_shardings(self):
    return self.state_shardings.params

  def _create_boxed_state(self) -> TrainState:
    shapes = self.example_batch(1, min(self.config.data.time_buckets))
    example = {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items()}
    return create_train_state(self.model, self.tx, self.config, example)

  def init_state(self) -> TrainState:
    return self._init()

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the train state, without allocating it."""
    return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self._state_shapes, self.state_shardings
    )


def open_data(
  config: ml_collections.ConfigDict, workdir: str, splits=("train", "val"), report_dir: str = ""
) -> dict[str, pipeline.DataSplit]:
  """Resolves (and if needed prepares) the dataset, opens `splits` with their load-time checks, checks the
  time buckets and writes the skip counts to REPORT_DIR/skipped_trials.json (default: the workdir). The
  resolved dataset folder is each split's `dataset_dir`; the config is not written to."""
  dataset_dir = prepare.resolve_dataset(config, workdir)
  out = {name: pipeline.open_split(dataset_dir, config, name, train=name == "train") for name in splits}
  for split in out.values():
    if not len(split):
      raise t15.DataError(f"{dataset_dir}: the {split.name} split has no trials left")
    pipeline.check_buckets(split, config.data.time_buckets)
  pipeline.write_skips(report_dir or workdir, list(out.values()))
  logging.info("data: %s from %s", ", ".join(f"{len(s)} {s.name}" for s in out.values()), dataset_dir)
  return out
