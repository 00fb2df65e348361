"""Orbax checkpoints: 'latest' for resuming (every N steps, on SIGTERM and at the end) and 'best' by val PER."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpoints:
  """Two managers under `workdir`: checkpoints/ (latest, resume) and best/ (lowest val PER, ties: lower loss).

  The state is a pytree (`TrainState`); the data position is its step (the sampler is stateless).
  """

  def __init__(self, workdir: str, max_to_keep: int = 2):
    self.latest = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))
    self.best = ocp.CheckpointManager(
        os.path.join(workdir, "best"), options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
    self.best_key = self._stored_best_key()

  def _stored_best_key(self) -> tuple[float, float] | None:
    step = self.best.latest_step()
    if step is None:
      return None
    meta = self.best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return (meta["val_per"], meta["val_loss"])

  def save_latest(self, state: Any, *, force: bool = False) -> None:
    step = int(jax.device_get(state.step))
    if self.latest.latest_step() == step:
      return
    self.latest.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=force)

  def maybe_save_best(self, state: Any, val_per: float, val_loss: float) -> bool:
    """Saves `state` as best when (val_per, val_loss) beats the best so far; returns whether it did."""
    key = (float(val_per), float(val_loss))
    if self.best_key is not None and key >= self.best_key:
      return False
    step = int(jax.device_get(state.step))
    meta = {"step": step, "val_per": key[0], "val_loss": key[1]}
    self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                   force=True)
    self.best_key = key
    logging.info("new best checkpoint at step %d: val PER %.4f, loss %.4f", step, *key)
    return True

  def restore(self, abstract_state: Any, which: str = "latest") -> Any | None:
    """Restores the newest readable checkpoint into the structure/shardings of `abstract_state` (arrays or
    ShapeDtypeStructs); None if there is none. Half-written saves are never listed by orbax; a finalized
    one that fails to read is skipped with a warning in favour of the one before it."""
    mngr = self.latest if which == "latest" else self.best
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    for step in sorted(mngr.all_steps(), reverse=True):
      try:
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint must not block the older ones
        logging.warning("checkpoint %s/%d is unreadable (%s: %s); falling back to an older one",
                        mngr.directory, step, type(e).__name__, str(e)[:300])
        continue
      logging.info("restored %s checkpoint of step %d from %s", which, step, mngr.directory)
      return restored["state"]
    return None

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()
