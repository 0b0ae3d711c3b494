"""Checkpoints of a run: the game state (params, optimizer states, step, RNG) and, beside it, a
JSON record of the host-side state (data iterator positions, stage, counters), via orbax.

Frozen players that never change during the stage (``constant``: a reference, a reward-model
judge, a snapshot) are written once, to ``<directory>.frozen``, not into every checkpoint; a
restore reads them back from there.

>>> ckpt = Checkpointer("/tmp/run/checkpoints", keep=3)      # doctest: +SKIP
>>> ckpt.save(100, state, {"data": loader.get_state()})      # doctest: +SKIP
>>> state, extra = ckpt.restore(abstract_state)              # latest  # doctest: +SKIP
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint is missing, unreadable or does not match the run."""


class Checkpointer:
  """An orbax CheckpointManager keeping the newest ``keep`` checkpoints of one directory."""

  def __init__(self, directory: str, keep: int = 3, constant: Sequence[str] = ()):
    self.directory = os.path.abspath(directory)
    self.constant = tuple(constant)         # names of frozen players written once
    self.constant_directory = self.directory + ".frozen"
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "extra"))

  def save(self, step: int, state: Any, extra: dict, force: bool = True) -> None:
    state, constant = self._split(state)
    if constant and not os.path.isdir(self.constant_directory):
      with ocp.StandardCheckpointer() as writer:      # orbax writes a temporary, then renames
        writer.save(self.constant_directory, constant)
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
    target, constant = self._split(jax.tree.map(_abstract, abstract_state))
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()))
      state = restored["state"]
      if constant:
        with ocp.StandardCheckpointer() as reader:
          fixed = reader.restore(self.constant_directory, constant)
        state = state.replace(frozen={**state.frozen, **fixed})
    except Exception as e:  # orbax raises many types; name the checkpoint and the cause
      raise CheckpointError(
          f"cannot restore checkpoint step {step} from {self.directory}: "
          f"{type(e).__name__}: {e}") from e
    return state, dict(restored["extra"])

  def _split(self, state: Any) -> tuple[Any, dict]:
    """``(state without the constant frozen players, those players)``."""
    if not self.constant:
      return state, {}
    frozen = dict(state.frozen)
    constant = {name: frozen.pop(name) for name in self.constant if name in frozen}
    return state.replace(frozen=frozen), constant

  def close(self) -> None:
    self._manager.close()


def _abstract(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
