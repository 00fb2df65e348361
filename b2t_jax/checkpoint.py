"""Orbax checkpoints: 'latest' for resuming (every N steps, on SIGTERM and at the end) and 'best' by val PER."""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

from b2t_jax.steps import NonFiniteError


class CheckpointError(RuntimeError):
  """A workdir holds checkpoints but none of them restores into this config's train state."""


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _check_finite(state: Any, where: str) -> None:
  if not bool(jax.device_get(_all_finite(state))):
    raise NonFiniteError(
      f"refusing to save a non-finite train state (NaN/Inf in params or optimizer moments) "
      f"to {where}; the checkpoints already there are left as they were"
    )


def _best_key(val_per: float, val_loss: float) -> tuple[float, float]:
  """Ordering key of the best checkpoint: NaN counts as the worst value, so it never wins a tie."""
  return tuple(math.inf if math.isnan(v) else v for v in (float(val_per), float(val_loss)))


class Checkpoints:
  """Two managers under `workdir`: checkpoints/ (latest, resume) and best/ (lowest val PER, ties: lower loss).

  The state is a pytree (`TrainState`); the data position is its step (the sampler is stateless).
  """

  def __init__(self, workdir: str, max_to_keep: int = 2, *, read_only: bool = False):
    """`read_only` (eval, infer): nothing under `workdir` is created or written."""
    if "://" not in workdir:  # orbax restores only from absolute paths (a relative --workdir failed on resume)
      workdir = os.path.abspath(workdir)

    def options(keep: int) -> ocp.CheckpointManagerOptions:
      if read_only:
        return ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None)
      return ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)

    self.latest = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), options=options(max_to_keep))
    self.best = ocp.CheckpointManager(os.path.join(workdir, "best"), options=options(1))
    self.best_key = self._stored_best_key()

  def best_meta(self) -> dict[str, Any] | None:
    """{'step', 'val_per', 'val_loss'} of the best checkpoint; None when there is none."""
    step = self.best.latest_step()
    if step is None:
      return None
    return self.best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def _stored_best_key(self) -> tuple[float, float] | None:
    meta = self.best_meta()
    return None if meta is None else _best_key(meta["val_per"], meta["val_loss"])

  def save_latest(self, state: Any, *, force: bool = False) -> None:
    step = int(jax.device_get(state.step))
    if self.latest.latest_step() == step:
      return
    _check_finite(state, f"{self.latest.directory}/{step}")
    self.latest.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=force)

  def maybe_save_best(self, state: Any, val_per: float, val_loss: float) -> bool:
    """Saves `state` as best when (val_per, val_loss) beats the best so far (NaN is the worst value); returns
    whether it did."""
    key = _best_key(val_per, val_loss)
    if self.best_key is not None and key >= self.best_key:
      return False
    step = int(jax.device_get(state.step))
    _check_finite(state, f"{self.best.directory}/{step}")
    meta = {"step": step, "val_per": float(val_per), "val_loss": float(val_loss)}
    self.best.save(
      step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
    )
    self.best_key = key
    logging.info("new best checkpoint at step %d: val PER %.4f, loss %.4f", step, *key)
    return True

  def restore(self, abstract_state: Any, which: str = "latest") -> Any | None:
    """Restores the newest readable checkpoint into the structure/shardings of `abstract_state` (arrays or
    ShapeDtypeStructs); None if there is none. Half-written saves are never listed by orbax; a finalized
    one that fails to read is skipped with a warning in favour of the one before it. Checkpoints of which
    none restores raise `CheckpointError`: training from scratch over them would be silent data loss."""
    mngr = self.latest if which == "latest" else self.best
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    errors = []
    for step in sorted(mngr.all_steps(), reverse=True):
      try:
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint must not block the older ones
        errors.append(f"step {step}: {type(e).__name__}: {str(e)[:300]}")
        logging.warning(
          "checkpoint %s/%d is unreadable (%s: %s); falling back to an older one",
          mngr.directory,
          step,
          type(e).__name__,
          str(e)[:300],
        )
        continue
      logging.info("restored %s checkpoint of step %d from %s", which, step, mngr.directory)
      return restored["state"]
    if errors:
      raise CheckpointError(
        f"none of the checkpoints in {mngr.directory} restores into this config's train state (it was written "
        "by another config or an older b2t_jax, or the files are damaged):\n  "
        + "\n  ".join(errors)
        + "\nRun with the config that wrote it (WORKDIR/config.json) or use a new --workdir"
      )
    return None

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()
