"""AdamW with the reference's parameter groups (SPEC §4).

Two groups: day layers (own LR schedule, no weight decay, absent-day rule) and everything else
(AdamW, decay on GRU/Dense kernels and h0 only). Global-norm clipping sits outside both so one norm
covers all gradients.

The absent-day rule: the reference keeps one parameter per day, so a day absent from a batch has no
gradient and PyTorch's Adam skips it entirely (moments and its own step count untouched). `day_adam`
reproduces that with per-day moments and per-day step counts, driven by a `day_present` mask.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.core import meta

DAY_PARAMS = ("day_weights", "day_biases")
DECAYED_PARAMS = ("w_ih", "w_hh", "kernel", "h0")


def _leaf_name(path) -> str:
  """The parameter's own name: the last dict key of its path (the path of a boxed parameter, as in the abstract
  train state, ends in the box's `value` attribute)."""
  return str([k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1])


def param_groups(params) -> Any:
  """'day' for per-day input layers, 'main' for the rest (same tree structure as params)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: "day" if _leaf_name(p) in DAY_PARAMS else "main", params)


def decay_mask(params) -> Any:
  """True for GRU/Dense kernels and h0 (weight decay applies), False for biases and day layers."""
  return jax.tree_util.tree_map_with_path(lambda p, _: _leaf_name(p) in DECAYED_PARAMS, params)


class DayAdamState(NamedTuple):
  count: Any  # per leaf: (n_days,) int32, Adam steps taken by each day
  mu: Any
  nu: Any


def day_adam(learning_rate: optax.Schedule, b1: float, b2: float, eps: float) -> optax.GradientTransformationExtraArgs:
  """Adam over leaves whose axis 0 is the day; days with `day_present[d] == False` are skipped entirely.

  The learning rate follows the global step (as the reference's scheduler does); bias correction uses
  each day's own step count (as PyTorch's per-parameter Adam state does).
  """

  def init_fn(params):
    zeros = lambda p: jnp.zeros_like(p, dtype=jnp.float32)
    # One step count per day (axis 0): an unannotated (replicated) array even where the parameter is boxed with
    # logical axis names, which describe the parameter's axes, not the count's.
    count = jax.tree.map(lambda p: jnp.zeros((p.shape[0],), jnp.int32), meta.unbox(params))
    return DayAdamState(count=count, mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params)), jnp.zeros(
      [], jnp.int32
    )

  def update_fn(updates, state, params=None, *, day_present=None, **extra):
    del params, extra
    adam, step = state
    lr = learning_rate(step)
    if day_present is None:
      day_present = jnp.ones(jax.tree.leaves(adam.count)[0].shape, bool)

    def where_present(g, new, old):
      return jnp.where(day_present.reshape((-1,) + (1,) * (g.ndim - 1)), new, old)

    mu = jax.tree.map(lambda g, m: where_present(g, b1 * m + (1 - b1) * g, m), updates, adam.mu)
    nu = jax.tree.map(lambda g, v: where_present(g, b2 * v + (1 - b2) * jnp.square(g), v), updates, adam.nu)
    count = jax.tree.map(lambda c: c + day_present.astype(jnp.int32), adam.count)

    def step_of(g, m, v, c):
      c = jnp.maximum(c, 1).astype(jnp.float32).reshape((-1,) + (1,) * (g.ndim - 1))
      u = -lr * (m / (1 - b1**c)) / (jnp.sqrt(v / (1 - b2**c)) + eps)
      return where_present(g, u, 0.0).astype(g.dtype)

    return jax.tree.map(step_of, updates, mu, nu, count), (DayAdamState(count, mu, nu), step + 1)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def lr_schedule(peak: float, end: float, warmup_steps: int, decay_steps: int) -> optax.Schedule:
  """Linear warm-up from 0, cosine to `end` at `decay_steps` (warm-up included), flat afterwards."""
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, decay_steps, end)


def learning_rate(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """The main group's schedule of `config.optim` (what the train step logs as `lr`)."""
  return lr_schedule(cfg.lr_peak, cfg.lr_min, cfg.warmup_steps, cfg.decay_steps)


def day_learning_rate(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """The day layers' schedule of `config.optim`."""
  return lr_schedule(cfg.day_lr_peak, cfg.day_lr_min, cfg.day_warmup_steps, cfg.decay_steps)


def create_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
  """The full optimizer; `update` takes the extra keyword `day_present` (n_days,) bool."""
  for name in ("warmup_steps", "day_warmup_steps"):
    if not 0 <= cfg[name] < cfg.decay_steps:
      raise ValueError(
        f"config.optim.{name}={cfg[name]} must be below config.optim.decay_steps={cfg.decay_steps} "
        "(the cosine ends at decay_steps, warm-up included)"
      )
  return grouped_optimizer(
    cfg,
    main=adamw(cfg, learning_rate(cfg)),
    day=day_adam(day_learning_rate(cfg), cfg.b1, cfg.b2, cfg.eps),
  )


def adamw(cfg: ml_collections.ConfigDict, lr: optax.ScalarOrSchedule) -> optax.GradientTransformation:
  """The main group's AdamW of `config.optim` (decay on kernels and h0 only) at learning rate `lr`."""
  return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)


def grouped_optimizer(
  cfg: ml_collections.ConfigDict, *, main: optax.GradientTransformation, day: optax.GradientTransformation
) -> optax.GradientTransformationExtraArgs:
  """Global-norm clipping of `config.optim`, then `main` on the main group and `day` on the day layers."""
  parts = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm > 0 else []
  return optax.chain(*parts, optax.multi_transform({"main": main, "day": day}, param_groups))


def guarded(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """`tx` behind optax.apply_if_finite: a step whose gradients hold a NaN/Inf applies no update and leaves params
  and moments as they were. Its state counts consecutive (`notfinite_count`) and total (`total_notfinite`)
  skips; it never gives up and applies a non-finite update: the training loop stops the run after
  `config.train.max_nonfinite_steps` consecutive skips instead."""
  return optax.apply_if_finite(tx, max_consecutive_errors=int(jnp.iinfo(jnp.int32).max))


def guarded_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
  """`create_optimizer` behind the non-finite guard (`guarded`)."""
  return guarded(create_optimizer(cfg))


def mark_trained_days(opt_state: Any, trained: np.ndarray) -> Any:
  """`opt_state` with every day-Adam step count set to 1 on the `trained` days and 0 elsewhere (a fresh state
  that `trained_days` reads back as `trained`)."""

  def mark(x):
    if not isinstance(x, DayAdamState):
      return x
    return x._replace(count=jax.tree.map(lambda c: jnp.asarray(trained, c.dtype), x.count))

  return jax.tree.map(mark, opt_state, is_leaf=lambda x: isinstance(x, DayAdamState))


def trained_days(opt_state: Any) -> np.ndarray | None:
  """(n_days,) bool: the days whose layers took at least one Adam step (the day-Adam step counts of an optimizer
  state of `create_optimizer`); None when the state holds no count or no day ever stepped (a fresh or imported
  optimizer state, which says nothing about the days)."""
  states = [
    s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, DayAdamState)) if isinstance(s, DayAdamState)
  ]
  counts = jax.tree.leaves(states[0].count) if states else []
  if not counts:
    return None
  stepped = np.asarray(jax.device_get(counts[0])) > 0
  return stepped if stepped.any() else None
