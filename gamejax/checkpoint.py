"""Checkpoints of a run: the game state (params, optimizer states, step, RNG) and, beside it, a
JSON record of the host-side state (data iterator positions, stage, counters), via orbax.

>>> ckpt = Checkpointer("/tmp/run/checkpoints", keep=3)      # doctest: +SKIP
>>> ckpt.save(100, state, {"data": loader.get_state()})      # doctest: +SKIP
>>> state, extra = ckpt.restore(abstract_state)              # latest  # doctest: +SKIP
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint is missing, unreadable or does not match the run."""


class Checkpointer:
  """An orbax CheckpointManager keeping the newest ``keep`` checkpoints of one directory."""

  def __init__(self, directory: str, keep: int = 3):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "extra"))

  def save(self, step: int, state: Any, extra: dict, force: bool = True) -> None:
    self._manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)), force=force)
    self._manager.wait_until_finished()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores ``step`` (default: the latest) into arrays shaped and sharded like
    ``abstract_state`` (a pytree of ``jax.ShapeDtypeStruct`` with shardings, or of arrays)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    target = jax.tree.map(_abstract, abstract_state)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types; name the checkpoint and the cause
      raise CheckpointError(
          f"cannot restore checkpoint step {step} from {self.directory}: "
          f"{type(e).__name__}: {e}") from e
    return restored["state"], dict(restored["extra"])

  def close(self) -> None:
    self._manager.close()


def _abstract(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
