"""Checkpoints of a run: the game state (params, optimizer states, step, RNG) and, beside it, a
JSON record of the host-side state (data iterator positions, stage, counters), via orbax.

Saves are asynchronous: ``save`` returns once the arrays are copied off the devices, and orbax
writes them in a background thread (into a temporary directory, renamed when complete), so the
step does not wait for the disk. A write that fails (a full disk) leaves the earlier checkpoints
as they were and surfaces as ``CheckpointWriteError`` at the next save or at ``close``.
``restore_latest`` falls back to the previous checkpoint when the latest cannot be read, and moves
the unreadable one aside (into ``<directory>.corrupt``).

Frozen players that never change during the stage (``constant``: a reference, a reward-model
judge, a snapshot) are written once, to ``<directory>.frozen``, not into every checkpoint; a
restore reads them back from there.

A model may store some weights fused (``fused``: ``lm.fused_storage``, e.g. Llama's ``wqkv``). A
checkpoint written before they were (``wq``, ``wk``, ``wv``, in params, optimizer moments and
frozen players alike) is restored by reading the standard leaves and joining them
(``standard_target``, ``fusion.fuse`` of the state): the same state as if it had been written
fused.

>>> ckpt = Checkpointer("/tmp/run/checkpoints", keep=3)      # doctest: +SKIP
>>> ckpt.save(100, state, {"data": loader.get_state()})      # doctest: +SKIP
>>> state, extra = ckpt.restore(abstract_state)              # latest  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Sequence

import jax
import orbax.checkpoint as ocp

from gamejax.models import fusion


class CheckpointError(RuntimeError):
  """A checkpoint is missing, unreadable or does not match the run."""


class CheckpointWriteError(RuntimeError):
  """Writing a checkpoint failed (a full disk, a lost mount); the earlier ones are intact."""


class Checkpointer:
  """An orbax CheckpointManager keeping the newest ``keep`` checkpoints of one directory."""

  def __init__(self, directory: str, keep: int = 3, constant: Sequence[str] = (),
               fused: fusion.Specs = ()):
    self.directory = os.path.abspath(directory)
    self.constant = tuple(constant)         # names of frozen players written once
    self.fused = tuple(fused)               # weights the model stores fused (see the docstring)
    self.constant_directory = self.directory + ".frozen"
    self._writing = None                    # the step of the save in flight
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "extra"))

  def save(self, step: int, state: Any, extra: dict, wait: bool = False) -> None:
    """Starts writing checkpoint ``step`` and returns once the arrays are off the devices (the
    previous save must have finished first); ``wait``: also wait for this write to finish."""
    self.wait()
    state, constant = self._split(state)
    if constant and not os.path.isdir(self.constant_directory):
      with self._writes(step):
        with ocp.StandardCheckpointer() as writer:    # orbax writes a temporary, then renames
          writer.save(self.constant_directory, constant)
    self._writing = int(step)
    with self._writes(step):
      self._manager.save(int(step), args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)), force=True)
    if wait:
      self.wait()

  def wait(self) -> None:
    """Waits for the save in flight; raises ``CheckpointWriteError`` if it failed."""
    if self._writing is None:
      return
    step, self._writing = self._writing, None
    with self._writes(step):
      self._manager.wait_until_finished()

  @contextlib.contextmanager
  def _writes(self, step: int):
    """Turns any error of writing checkpoint ``step`` into ``CheckpointWriteError`` naming the
    step, the directory and the checkpoints that stay intact."""
    try:
      yield
    except (CheckpointWriteError, KeyboardInterrupt):
      raise
    except Exception as error:  # noqa: BLE001 - orbax and tensorstore raise many kinds
      try:
        self._manager.reload()
        intact = [s for s in self._manager.all_steps() if s != step]
      except Exception:  # noqa: BLE001 - the listing is only part of the message
        intact = "unknown"
      raise CheckpointWriteError(
          f"writing checkpoint step {step} to {self.directory} failed: "
          f"{type(error).__name__}: {str(error)[:500]}; the earlier checkpoints {intact} are "
          "intact") from error

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore_latest(self, abstract_state: Any, log: Callable[[str], None] = print
                     ) -> tuple[int, Any, dict] | None:
    """``(step, state, extra)`` of the newest checkpoint that can be read (None: there is none).

    When the newest cannot be read (cut short, a file lost) but an older one can, the unreadable
    ones are reported through ``log`` and moved to ``<directory>.corrupt/`` (a later save may
    reuse their step numbers). When none can be read, nothing is moved (a run whose config no
    longer matches its checkpoints fails on every one) and the error names each failure."""
    failures = {}
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state, extra = self.restore(abstract_state, step)
      except CheckpointError as e:
        failures[step] = str(e)
        continue
      for bad, why in failures.items():
        log(f"warning: checkpoint step {bad} in {self.directory} cannot be read ({why}); moved "
            f"to {self._move_aside(bad)}; resuming from step {step}")
      return step, state, extra
    if failures:
      raise CheckpointError("no checkpoint in {} can be read:\n  {}".format(
          self.directory, "\n  ".join(failures.values())))
    return None

  def _move_aside(self, step: int) -> str:
    """Moves checkpoint ``step`` out of the manager's way (a later save may reuse its number)."""
    aside = os.path.join(self.directory + ".corrupt", f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(aside), exist_ok=True)
      os.replace(os.path.join(self.directory, str(step)), aside)
    self._manager.reload()
    return aside

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores ``step`` (default: the latest) into arrays shaped and sharded like
    ``abstract_state`` (a pytree of ``jax.ShapeDtypeStruct`` with shardings, or of arrays)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    target, constant = self._split(jax.tree.map(_abstract, abstract_state))
    try:
      return self._read(step, target, constant)
    except Exception as e:  # orbax raises many types; name the checkpoint and the cause
      standard = self._read_standard(step, target, constant) if self.fused else None
      if standard is None:
        raise CheckpointError(
            f"cannot restore checkpoint step {step} from {self.directory}: "
            f"{type(e).__name__}: {e}") from e
    state, extra = standard
    return jax.device_put(fusion.fuse(state, self.fused),
                          jax.tree.map(lambda x: _abstract(x).sharding, abstract_state)), extra

  def _read_standard(self, step: int, target: Any, constant: dict) -> tuple[Any, dict] | None:
    """Checkpoint ``step`` read as written before the model stored ``self.fused`` weights fused
    (``standard_target``), not yet joined; None when it is not such a checkpoint either."""
    try:
      return self._read(step, *(standard_target(t, self.fused) for t in (target, constant)))
    except Exception:  # noqa: BLE001 - not that either: the caller reports the first error
      return None

  def _read(self, step: int, target: Any, constant: dict) -> tuple[Any, dict]:
    """Checkpoint ``step`` read into ``target`` and the constant frozen players into
    ``constant`` (orbax's errors as they are)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()))
    state = restored["state"]
    if constant:
      with ocp.StandardCheckpointer() as reader:
        fixed = reader.restore(self.constant_directory, constant)
      state = state.replace(frozen={**state.frozen, **fixed})
    return state, dict(restored["extra"])

  def _split(self, state: Any) -> tuple[Any, dict]:
    """``(state without the constant frozen players, those players)``."""
    if not self.constant:
      return state, {}
    frozen = dict(state.frozen)
    constant = {name: frozen.pop(name) for name in self.constant if name in frozen}
    return state.replace(frozen=frozen), constant

  def close(self) -> None:
    """Waits for the save in flight (``CheckpointWriteError`` if it failed), then closes."""
    try:
      self.wait()
    finally:
      self._manager.close()


def _abstract(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def standard_target(target: Any, specs: fusion.Specs) -> Any:
  """``target`` (a state of ``jax.ShapeDtypeStruct``) as a checkpoint written before ``specs``
  stored weights fused holds it: every fused leaf replaced by its standard parts, their shapes cut
  from it (their sharding that of the fused leaf, the joined axis not split)."""
  def part(x: jax.ShapeDtypeStruct, spec: fusion.Fused, i: int) -> jax.ShapeDtypeStruct:
    shape, sharding = list(x.shape), x.sharding
    if spec.sizes:
      shape[spec.axis] = spec.sizes[i]
    else:
      del shape[spec.axis]
    if isinstance(sharding, jax.sharding.NamedSharding):
      axes = list(sharding.spec) + [None] * (len(x.shape) - len(sharding.spec))
      if spec.sizes:
        axes[spec.axis] = None
      else:
        del axes[spec.axis]
      sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*axes))
    return jax.ShapeDtypeStruct(tuple(shape), x.dtype, sharding=sharding)

  def one(node: dict) -> dict:
    for spec in specs:
      x = node.get(spec.name)
      if isinstance(x, jax.ShapeDtypeStruct):
        node = {k: v for k, v in node.items() if k != spec.name} | {
            p: part(x, spec, i) for i, p in enumerate(spec.parts)}
    return node

  return fusion.map_dicts(target, one)
