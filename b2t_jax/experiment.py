"""What train, eval, infer and the tools share: the model, optimizer, mesh, train-state shardings, jitted steps
and the opening of the data of one config."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import linen as nn

from b2t_jax import sharding
from b2t_jax.data import pipeline, prepare, t15
from b2t_jax.models import create_model
from b2t_jax.optim import guarded_optimizer
from b2t_jax.steps import (
  TrainState,
  create_ensemble_state,
  create_train_state,
  ensemble_train_step,
  eval_step,
  train_step,
)

_STACKED = ("params", "opt_state", "rng")  # the TrainState fields an ensemble stacks (steps.MEMBER_AXES)


class Experiment:
  """Model, optimizer, mesh and the jitted steps of one config (`tx`: another optimizer than the config's, as
  calibration uses)."""

  def __init__(self, config: ml_collections.ConfigDict, mesh=None, tx: optax.GradientTransformation | None = None):
    self.config = config
    self.model = create_model(config)
    self.tx = guarded_optimizer(config.optim) if tx is None else tx
    self.mesh = sharding.create_mesh(config.mesh_shape) if mesh is None else mesh
    repl = sharding.replicated(self.mesh)
    data = sharding.batch_sharding(self.mesh)
    # The init is traced once for shapes; its boxes (every parameter's logical axes, which the optimizer's moments
    # inherit) give every leaf's sharding. The arrays themselves are unboxed.
    boxed = jax.eval_shape(self._create_boxed_state)
    self._state_shapes = nn.unbox(boxed)
    st = sharding.tree_shardings(boxed, self.mesh, config.logical_axis_rules)
    if config.fsdp:
      st = sharding.fsdp_shardings(st, self._state_shapes, self.mesh, config.fsdp_min_size)
    self.state_shardings = st
    step = train_step if self.n_models == 1 else ensemble_train_step
    self.train_step = jax.jit(
      functools.partial(step, model=self.model, tx=self.tx, config=config),
      in_shardings=(st, data),
      out_shardings=(st, repl),
      donate_argnums=0,
    )
    self.eval_step = jax.jit(
      functools.partial(eval_step, model=self.model, config=config), in_shardings=(st.params, data), out_shardings=data
    )
    self._init = jax.jit(lambda: nn.unbox(self._create_boxed_state()), out_shardings=st)

  @property
  def n_models(self) -> int:
    """Ensemble members trained together (config.train.n_models); their state is stacked on axis 0."""
    return self.config.train.n_models

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

  def _example(self) -> dict[str, jax.Array]:
    shapes = self.example_batch(1, min(self.config.data.time_buckets))
    return {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items()}

  def _create_boxed_state(self) -> TrainState:
    create = create_train_state if self.n_models == 1 else create_ensemble_state
    return create(self.model, self.tx, self.config, self._example())

  def init_state(self) -> TrainState:
    if self.n_models == 1:
      return self._init()
    # Member by member, then stacked: a vmapped init batches the orthogonal initialiser's LAPACK QR calls, and
    # those hang on a multi-device CPU backend (jaxlib 0.10.2, 2 cores, 2+ simulated devices); each member's init
    # is the single model's of its seed.
    one = jax.jit(lambda m: nn.unbox(create_train_state(self.model, self.tx, self.config, self._example(), m)))
    members = [one(k) for k in range(self.n_models)]
    stack = jax.jit(
      lambda ms: ms[0].replace(
        **{f: jax.tree.map(lambda *a: jnp.stack(a), *[getattr(m, f) for m in ms]) for f in _STACKED}
      ),
      out_shardings=self.state_shardings,
    )
    return stack(members)

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
