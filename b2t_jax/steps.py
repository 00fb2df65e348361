"""The train and eval steps: pure functions of (state, batch), jitted with shardings by train.py."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn
from flax import struct
from flax.core import meta

from b2t_jax import losses
from b2t_jax.data.augment import preprocess
from b2t_jax.optim import learning_rate
from b2t_jax.patching import n_patches

# Counters of the non-finite guard: the host reports their value at the last step of a log window, not a mean.
COUNTER_METRICS = ("nonfinite_steps", "nonfinite_consecutive")


class NonFiniteError(FloatingPointError):
  """Training produced only non-finite steps for too long, or a non-finite state was about to be saved."""


class TrainState(struct.PyTreeNode):
  """Everything a resume needs: the step (which also fixes the next batch), params, optimizer state and
  the base PRNG key (per-step keys are `fold_in(rng, step)`, so no key is carried forward)."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


# vmap axes of a K-member ensemble's state: params, optimizer state and PRNG key stacked on axis 0, one step count.
MEMBER_AXES = TrainState(step=None, params=0, opt_state=0, rng=0)
MEMBER_AXIS_NAME = "members"  # logical name of the stacked axis (config.logical_axis_rules maps it)


def create_train_state(
  model: nn.Module, tx: optax.GradientTransformation, config, example_batch, member: jax.Array | int = 0
) -> TrainState:
  """Initialises params from `config.seed + member` on a shape-only example batch (member k of an ensemble is
  the single model of seed + k). Params, and the optimizer moments initialised from them, stay boxed with their
  logical axis names (`sharding.tree_shardings` reads them; `nn.unbox` gives the arrays the steps take)."""
  key = jax.random.PRNGKey(config.seed + member)
  init_key, base_key = jax.random.split(key)
  params = model.init({"params": init_key}, example_batch["features"], example_batch["day"])["params"]
  return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params), rng=base_key)


def grl_lambda(config: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
  """λ of the gradient reversal: linear ramp from 0 over the adversarial warm-up, then constant."""
  lam = jnp.asarray(config.model.grl_lambda, jnp.float32)
  warm = config.loss.adversarial_warmup_steps
  if warm > 0:
    lam = lam * jnp.minimum(step.astype(jnp.float32) / warm, 1.0)
  return lam


def _micro_batches(tree, n: int):
  """(B, ...) -> (n, B / n, ...), micro-batch i = rows i, i + n, ... so every device keeps its own rows."""
  return jax.tree.map(lambda a: a.reshape((a.shape[0] // n, n) + a.shape[1:]).swapaxes(0, 1), tree)


def days_present(batch: dict, config: ml_collections.ConfigDict) -> jax.Array:
  """(n_days,) bool: the days with at least one real (weight > 0) trial in `batch` (the optimizer's absent-day
  rule skips the others)."""
  n_days = len(config.data.sessions)
  return jnp.zeros((n_days,), jnp.float32).at[batch["day"]].add(batch["weight"]) > 0


def train_step(
  state: TrainState,
  batch: dict,
  *,
  model: nn.Module,
  tx: optax.GradientTransformation,
  config: ml_collections.ConfigDict,
) -> tuple[TrainState, dict]:
  """One optimizer step: augment -> model ('full' mode) -> loss -> grads (accumulated) -> AdamW. `tx` is
  `optim.guarded_optimizer` (its state carries the non-finite counters reported in the metrics)."""
  key = jax.random.fold_in(state.rng, state.step)
  aug_key, drop_key = jax.random.split(key)
  x, lengths = preprocess(aug_key, batch["features"], batch["n_time_steps"], config.aug)
  input_lens = n_patches(lengths, config.model.patch_size, config.model.patch_stride)
  feasible = losses.feasible_mask(input_lens, batch["labels"], batch["label_lens"])
  # One normaliser for the whole batch makes the accumulated loss equal the large-batch mean.
  denom = jnp.maximum(jnp.sum(batch["weight"] * feasible), 1.0)
  lam = grl_lambda(config, state.step)
  n_micro = config.optim.grad_accum_steps

  def loss_fn(params, mb, rng):
    outputs = model.apply(
      {"params": params}, mb["x"], mb["day"], train=True, mode="full", grl_lambda=lam, rngs={"dropout": rng}
    )
    return losses.decoder_loss(
      outputs,
      mb["input_lens"],
      mb["labels"],
      mb["label_lens"],
      mb["weight"],
      noisy_weight=config.loss.noisy_weight,
      noise_l2_weight=config.loss.noise_l2_weight / n_micro,
      intermediate_weight=config.loss.intermediate_ctc_weight,
      phoneme_weight=config.loss.phoneme_ctc_weight,
      marginal_weight=config.loss.marginal_ctc_weight,
      denom=denom,
    )

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  data = {
    "x": x,
    "day": batch["day"],
    "input_lens": input_lens,
    "labels": batch["labels"],
    "label_lens": batch["label_lens"],
    "weight": batch["weight"],
  }
  if n_micro == 1:
    (loss, aux), grads = grad_fn(state.params, data, drop_key)
  else:
    micro = _micro_batches(data, n_micro)

    def body(carry, inp):
      i, mb = inp
      (l, a), g = grad_fn(state.params, mb, jax.random.fold_in(drop_key, i))
      return jax.tree.map(jnp.add, carry, (l, a, g)), None

    shapes = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda a: a[0], micro), drop_key)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0][0], shapes[0][1], shapes[1]))
    (loss, aux, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(n_micro), micro))
    if "noise_l2" in aux:  # a per-micro-batch mean, summed: report the mean
      aux = {**aux, "noise_l2": aux["noise_l2"] / n_micro}
  updates, opt_state = tx.update(grads, state.opt_state, state.params, day_present=days_present(batch, config))
  params = optax.apply_updates(state.params, updates)
  # optim.guarded_optimizer: a non-finite step applied zero updates; its counters travel in the metrics, which
  # the host reads at log cadence anyway (no extra sync).
  metrics = {
    "loss": loss,
    **aux,
    "nonfinite_steps": opt_state.total_notfinite,
    "nonfinite_consecutive": opt_state.notfinite_count,
    "grad_norm": optax.tree.norm(grads),
    "update_norm": optax.tree.norm(updates),
    "param_norm": optax.tree.norm(params),
    "grl_lambda": lam,
    "lr": learning_rate(config.optim)(state.step),
  }
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def create_ensemble_state(model: nn.Module, tx: optax.GradientTransformation, config, example_batch) -> TrainState:
  """`config.train.n_models` members' states (`create_train_state` of member 0..K-1) stacked on a leading axis
  that every boxed leaf names `members`."""
  members = jnp.arange(config.train.n_models)
  stacked = jax.vmap(lambda m: create_train_state(model, tx, config, example_batch, m), out_axes=MEMBER_AXES)(members)

  def name_member_axis(box):
    if not isinstance(box, meta.AxisMetadata) or not jax.tree.leaves(box.unbox()):
      return box  # plain arrays replicate; empty boxes (optax.masked) stay empty
    return box.replace(names=(MEMBER_AXIS_NAME, *box.names))

  return jax.tree.map(name_member_axis, stacked, is_leaf=meta.is_axis_metadata)


def ensemble_train_step(
  state: TrainState,
  batch: dict,
  *,
  model: nn.Module,
  tx: optax.GradientTransformation,
  config: ml_collections.ConfigDict,
) -> tuple[TrainState, dict]:
  """Every member's `train_step` on the same batch in one program (vmap over the stacked state): members differ
  only in their seeds (init, dropout, augmentation). Metrics are the members' mean (the non-finite counters
  their maximum), plus each member's loss as `loss_member_<k>`."""
  step = jax.vmap(
    functools.partial(train_step, model=model, tx=tx, config=config),
    in_axes=(MEMBER_AXES, None),
    out_axes=(MEMBER_AXES, 0),
  )
  state, per_member = step(state, batch)
  metrics = {k: v.max(0) if k in COUNTER_METRICS else v.mean(0) for k, v in per_member.items()}
  metrics.update({f"loss_member_{k}": per_member["loss"][k] for k in range(config.train.n_models)})
  return state, metrics


def merge_log_probs(logits: jax.Array, axis: int = 0) -> jax.Array:
  """Members' logits -> the ensemble's per-frame log-probabilities: the mean of the members' log-softmax over
  `axis`, renormalised (the argmax is that of the plain mean)."""
  return jax.nn.log_softmax(jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=axis), axis=-1)


def inference_logits(
  params: Any, batch: dict, *, model: nn.Module, config: ml_collections.ConfigDict
) -> tuple[jax.Array, jax.Array]:
  """Eval-time preprocessing (smoothing only) and the inference-mode forward pass on a padded batch:
  (logits (B, P, C), valid patches per trial (B,), negative for trials shorter than a patch). C is the phoneme
  classes whatever `model.targets`: a diphone model returns its marginal log-probabilities."""
  x, lengths = preprocess(None, batch["features"], batch["n_time_steps"], config.aug)
  input_lens = n_patches(lengths, config.model.patch_size, config.model.patch_stride)
  return model.apply({"params": params}, x, batch["day"], train=False, mode="inference"), input_lens


def ensemble_logits(
  params: Any, batch: dict, *, model: nn.Module, config: ml_collections.ConfigDict
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """(logits (B, P, C), valid patches (B,), members' logits (B, K, P, C) or None): for one model its logits,
  for a K-member ensemble (`config.train.n_models` > 1, params stacked) the merged log-probabilities."""
  fn = functools.partial(inference_logits, model=model, config=config)
  if config.train.n_models == 1:
    return (*fn(params, batch), None)
  members, input_lens = jax.vmap(fn, in_axes=(0, None), out_axes=(1, None))(params, batch)
  return merge_log_probs(members, axis=1), input_lens, members


def eval_step(params: Any, batch: dict, *, model: nn.Module, config: ml_collections.ConfigDict) -> dict:
  """Inference-mode forward pass on a padded eval batch: per-trial CTC loss and per-frame argmax (of the merged
  log-probabilities for an ensemble, whose members' argmax is 'member_pred' (B, K, P)).

  The loss (the val loss, and the best checkpoint's tie-break) is the phoneme CTC of what is decoded, for every
  `model.targets`: for diphone targets the CTC of the marginal phoneme posteriors, not the diphone CTC trained on,
  so that it ranks what PER and the word decoder read, means the same for one model and an ensemble (merged over
  marginals), and compares across targets."""
  logits, input_lens, members = ensemble_logits(params, batch, model=model, config=config)
  nll, feasible = losses.ctc_per_trial(logits, input_lens, batch["labels"], batch["label_lens"])
  out = {
    "nll": jnp.where(feasible, nll, 0.0),
    "feasible": feasible,
    "input_lens": jnp.maximum(input_lens, 0),
    "pred": jnp.argmax(logits, axis=-1).astype(jnp.int32),
  }
  if members is not None:
    out["member_pred"] = jnp.argmax(members, axis=-1).astype(jnp.int32)
  return out
