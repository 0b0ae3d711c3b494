"""What a run does when things go wrong: preemption (SIGTERM), a crash followed by ``--resume``,
non-finite payoffs.

- ``PreemptionWatch`` turns SIGTERM into a flag the loop reads after each call: it then finishes
  the call, saves a checkpoint and raises ``Preempted`` (``gamejax train`` exits 0, and the
  relaunched run resumes). On several processes the decision is JAX's preemption sync point, so
  every process saves at the same step.
- ``keep_metrics_until`` drops the rows a crashed run logged after its last checkpoint, so that
  a resumed run logs every step exactly once.
- ``NonFiniteStop`` ends a stage whose ``on_nonfinite='stop'`` at the first skipped update,
  before any checkpoint holds the state after it.
"""
from __future__ import annotations

import json
import os
import signal
import threading
from typing import Sequence

import jax


class Preempted(Exception):
  """The run was asked to stop (SIGTERM) and saved a checkpoint to resume from."""

  def __init__(self, stage: str, step: int, directory: str):
    super().__init__(f"preempted: stage {stage!r} saved its checkpoint at step {step} in "
                     f"{directory}; relaunch with --resume to continue")
    self.stage, self.step = stage, step


class NonFiniteStop(RuntimeError):
  """A stage with ``on_nonfinite='stop'`` met a non-finite payoff or gradient."""


class PreemptionWatch:
  """While entered, SIGTERM sets a flag instead of killing the process (one process);
  ``reached()``, asked after each call, says whether to save and stop there. On several processes
  it asks JAX's preemption sync point instead, which the distributed runtime arms for SIGTERM
  itself, so every process agrees on the step."""

  def __init__(self):
    self._flag = threading.Event()
    self._previous = None
    self._asked = 0       # the sync point's step ids: one per question, rising across stages

  def __enter__(self) -> "PreemptionWatch":
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_signal(self, signum, frame) -> None:
    del signum, frame
    self._flag.set()

  def reached(self) -> bool:
    """Whether to save and stop now (after a call). Every process asks at the same points; JAX's
    sync point wants step ids that only rise, so it is given the number of questions asked so
    far (a stage's own steps restart at each stage)."""
    self._asked += 1
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      return bool(multihost_utils.reached_preemption_sync_point(self._asked))
    return self._flag.is_set()


def keep_metrics_until(path: str, stage: str, step: int, later: Sequence[str] = ()) -> int:
  """Rewrites ``metrics.jsonl`` without the rows of ``stage`` after ``step`` (those a crashed
  run logged after the checkpoint it resumes from), the rows of the ``later`` stages and a torn
  last line. Returns how many rows it dropped. Written to a temporary file, then renamed."""
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:          # a line cut short by a kill
        dropped += 1
        continue
      if row.get("stage") in later or (row.get("stage") == stage and row.get("step", 0) > step):
        dropped += 1
        continue
      kept.append(line if line.endswith("\n") else line + "\n")
  if dropped:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(tmp, path)
  return dropped
