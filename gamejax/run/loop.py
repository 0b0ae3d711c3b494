"""The loop: one stage played from its latest checkpoint to its last step.

Batches stream from the stage's loader, K compiled game steps run per host call, metrics are read
one call late (so reading them never stalls the device) and appended to ``metrics.jsonl`` (by
process 0 only), checkpoints carry every learner's params and optimizer state, the followers, the
RNG, the loader's position and the counted events.

A checkpoint is saved only once every call before it has been logged and counted, so that a run
killed at any moment and resumed (``--resume``) ends with the params, the ``metrics.jsonl`` rows
(each step once: those logged after the checkpoint it resumes from are dropped) and the counts of
a run never interrupted. SIGTERM saves a checkpoint after the current call and stops
(``faults.Preempted``).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from gamejax import distributed, sharding, step as game_step
from gamejax.checkpoint import Checkpointer
from gamejax.data import sources
from gamejax.models import lm
from gamejax.run import assembly, evaluation, faults
from gamejax.run.schema import COUNTED, Experiment

def write_json_atomic(path: str, obj: Any) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def _to_python(x):
  x = np.asarray(x)
  return x.item() if x.ndim == 0 else x.tolist()


class MetricsWriter:
  """Appends one JSON object per logged step to ``metrics.jsonl``; on process 0 only (the
  others' rows are the same)."""

  def __init__(self, path: str):
    self._f = open(path, "a") if jax.process_index() == 0 else None

  def write(self, row: Mapping[str, Any]) -> None:
    if self._f is None:
      return
    self._f.write(json.dumps({k: _to_python(v) if not isinstance(v, str) else v
                              for k, v in row.items()}) + "\n")
    self._f.flush()

  def close(self):
    if self._f is not None:
      self._f.close()


def _stack(batches: Sequence[Mapping[str, np.ndarray]]) -> dict:
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


@dataclasses.dataclass
class StageResult:
  params: dict          # each learner's final params, by name (LoRA learners' merged)
  metrics: dict


def run_stage(exp: Experiment, index: int, finals: Mapping[str, Any] | None, workdir: str, mesh,
              progress: bool = True, eval_examples=None, log: Callable[[str], None] = print,
              stop_after_steps: int | None = None, judge_params=None,
              preemption: faults.PreemptionWatch | None = None) -> StageResult:
  """Plays one stage from its latest checkpoint (if any) to ``stage.steps``; its learners start
  from ``finals`` (earlier stages' final params by stage name, then learner name; None: fresh).

  ``preemption`` (default: a watch of this stage alone) is read after every call: once it says
  so, the stage saves a checkpoint and raises ``faults.Preempted``."""
  stage = exp.stages[index]
  sharding.check_batch_size(mesh, stage.batch_size)
  source = None
  if stage.data is not None:
    source = stage.data.load("train", sources.resolve_data_dir(exp.data_dir))
  loader = assembly.stage_loader(exp, index, source)
  game = assembly.stage_game(exp, index)
  init_players = assembly.initial_players(exp, index, finals, mesh)
  make_state = functools.partial(assembly.stage_state, exp, index, game,
                                 judge_params=judge_params,
                                 earlier=assembly.earlier_players(exp, index, finals or {}))
  abstract = jax.eval_shape(make_state, init_players)
  step_fn, state_sharding = game_step.make_step(game, mesh, abstract)
  batch_sharding = sharding.batch_sharding(mesh, leading=1)

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints", stage.name), keep=exp.keep_checkpoints,
                      constant=assembly.constant_players(exp, index),
                      fused=lm.fused_storage(exp.model))
  accuracy_at = {}             # held-out accuracy every eval_every steps: "step" -> accuracy
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, state_sharding)
  restored = ckpt.restore_latest(target, log=log)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if jax.process_index() == 0:          # rows logged after the checkpoint are logged again
    faults.keep_metrics_until(metrics_path, stage.name, -1 if restored is None else restored[0],
                              later=[s.name for s in exp.stages[index + 1:]])
  if restored is not None:
    start, state, extra = restored
    loader.set_state(extra["data"])
    resumed_counts = dict(extra.get("counts", {}))
    accuracy_at.update(extra.get("accuracy_at", {}))
    log(f"[{stage.name}] resumed from step {start}")
  else:
    state = jax.jit(make_state, out_shardings=state_sharding)(init_players)
    resumed_counts = {}
    start = 0

  if jax.process_count() > 1:           # this process reads and feeds only its devices' rows
    loader.only_rows(distributed.process_rows(batch_sharding, (stage.steps_per_call,
                                                               stage.batch_size), axis=1))
  writer = MetricsWriter(metrics_path)
  k = stage.steps_per_call
  end = stage.steps if stop_after_steps is None else min(stage.steps, stop_after_steps)
  bar = _progress(stage.name, start, stage.steps, progress)
  clock = Throughput()
  last_loss, pending, tokens = math.nan, None, 0
  last_losses = {}             # each learner's
  last_probes = {}             # the probes' metrics (payoff parts of value 0) of the last call
  counts = resumed_counts      # events summed over the stage (see COUNTED)

  def flush(step_no, metrics):
    """Logs a call's metrics once the next call is queued, so reading them never stalls."""
    nonlocal last_loss, tokens
    metrics = jax.device_get(metrics)
    tokens += int(np.sum(metrics.get("play/tokens", metrics.get("play/completion_tokens", 0))))
    row = {"stage": stage.name, "step": step_no}
    row.update({key: float(np.mean(v)) for key, v in metrics.items()})
    events = count_events(metrics)
    for label, n in events.items():
      counts[label] = counts.get(label, 0) + n
    rate = clock.mark(tokens)
    if math.isfinite(rate):              # the first read has no interval before it
      row["tokens_per_s"] = rate
    last_loss = row["loss"]
    last_probes.update({key: v for key, v in row.items() if "probe/" in key
                        and not key.endswith("/payoff")})
    last_losses.update({name: row[f"{name}/loss"] for name in game.learners
                        if f"{name}/loss" in row})
    writer.write(row)
    bar.update(k)
    bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row.get('tokens_per_s', 0):.0f}")
    if stage.on_nonfinite == "stop" and events.get("skipped_nonfinite"):
      last = ckpt.latest_step()
      raise faults.NonFiniteStop(
          f"stage {stage.name!r}: a non-finite payoff or gradient in the {k} steps up to step "
          f"{step_no} (on_nonfinite='stop'; its update was skipped); the last good checkpoint is "
          + (f"step {last} in {ckpt.directory}" if last is not None else "none: no checkpoint "
             "was saved yet"))

  def save(step_no, wait=False):
    """A checkpoint of ``state`` after ``step_no``, once every call before it is logged."""
    nonlocal pending
    if pending is not None:
      flush(*pending)
      pending = None
    ckpt.save(step_no, state, {"data": loader.get_state(), "stage": stage.name,
                               "counts": counts, "accuracy_at": accuracy_at}, wait=wait)

  def evaluate_now(state, step_no) -> float:
    """Held-out accuracy of the agent's current policy, logged as ``eval/accuracy``."""
    players = distributed.on_every_host(assembly.resolved_players(state.params, state.frozen))
    policy_params = assembly.policies_of(exp, index, players)["agent"]
    figures = evaluation.evaluate(exp, policy_params, eval_examples)
    writer.write({"stage": stage.name, "step": step_no, "eval/accuracy": figures["accuracy"]})
    log(f"[{stage.name}] step {step_no}: held-out accuracy {figures['accuracy']:.4f}")
    return figures["accuracy"]

  watch = preemption or faults.PreemptionWatch()
  try:
    if preemption is None:
      watch.__enter__()
    if stage.eval_at_start and start == 0 and "0" not in accuracy_at:
      accuracy_at["0"] = evaluate_now(state, 0)
    for step_no in range(start + k, end + 1, k):
      batches = _stack([next(loader) for _ in range(k)])
      state, metrics = step_fn(state, distributed.global_batch(batches, batch_sharding,
                                                                rows=stage.batch_size))
      if pending is not None:
        flush(*pending)
      pending = (step_no, metrics)
      if stage.eval_every and step_no % stage.eval_every == 0 and step_no < stage.steps:
        flush(*pending)
        pending = None
        accuracy_at[str(step_no)] = evaluate_now(state, step_no)
      if step_no < end and watch.reached():
        save(step_no, wait=True)
        raise faults.Preempted(stage.name, step_no, ckpt.directory)
      if step_no % stage.checkpoint_every == 0 and step_no < end:
        save(step_no)
    if pending is not None:
      flush(*pending)
      pending = None
    if end > start:
      save(end, wait=True)
  finally:
    if preemption is None:
      watch.__exit__(None, None, None)
    bar.close()
    writer.close()
    ckpt.close()
  frozen = distributed.on_every_host(dict(state.frozen))
  players = distributed.on_every_host(assembly.resolved_players(state.params, state.frozen))
  result = {"steps": end, "loss": last_loss, **counts}
  if last_probes:
    result["probes"] = last_probes      # exact figures of the params, over the last call's steps
  if len(players) > 1:
    result["players"] = {name: {"loss": last_losses.get(name, math.nan)} for name in players}
  if counts.get("skipped_nonfinite"):
    log(f"[{stage.name}] {counts['skipped_nonfinite']} updates skipped: non-finite payoff or "
        "gradient (the parameters were left as they were)")
  stats = getattr(loader, "stats", {})
  result.update({k: stats[k] for k in ("truncated", "skipped") if k in stats})
  if clock.steady_rate() is not None:
    result["tokens_per_s"] = clock.steady_rate()
  if stats.get("truncated") or stats.get("skipped"):
    log(f"[{stage.name}] records longer than seq_len={stage.seq_len}: "
        f"{stats['truncated']} truncated, {stats['skipped']} skipped")
  if end == stage.steps:
    result.update(evaluation.evaluate_stage(exp, index, players, eval_examples, frozen=frozen))
    if accuracy_at and "accuracy" in result:
      result["accuracy_at"] = {**accuracy_at, str(end): result["accuracy"]}
  return StageResult(params=players, metrics=result)


def count_events(metrics: Mapping[str, Any]) -> dict[str, int]:
  """The counted events (``COUNTED``) of one call's metrics, summed over its K steps.

  Within a step, the metrics of one event are summed over players (``agent/...``, ``play/...``)
  and, within a player, the largest count of its payoff's parts is taken: two parts that read the
  same rewards (``weighted({"rloo": ..., "grpo": ...})``) count a non-finite reward once.
  """
  per_step: dict[str, dict[str, np.ndarray]] = {}
  for key, value in metrics.items():
    label = COUNTED.get(key.rsplit("/", 1)[-1])
    if label is None:
      continue
    player = key.split("/", 1)[0]
    value = np.asarray(value, np.float64)
    seen = per_step.setdefault(label, {})
    seen[player] = np.maximum(seen[player], value) if player in seen else value
  return {label: int(round(float(sum(np.sum(v) for v in by_player.values()))))
          for label, by_player in per_step.items()}


class Throughput:
  """Tokens/s between metric reads. The first read waited for compilation, so it starts the
  clock of the steady rate; each later read also gives the rate since the one before."""

  def __init__(self):
    self._first = self._last = None      # (time, tokens done)

  def mark(self, tokens_done: int) -> float:
    now = time.perf_counter()
    rate = math.nan if self._last is None else (
        (tokens_done - self._last[1]) / max(now - self._last[0], 1e-9))
    self._first = self._first or (now, tokens_done)
    self._last = (now, tokens_done)
    return rate

  def steady_rate(self) -> float | None:
    if self._first is None or self._last[0] <= self._first[0]:
      return None
    return (self._last[1] - self._first[1]) / (self._last[0] - self._first[0])


def _progress(name: str, start: int, total: int, enabled: bool):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=start, desc=name, disable=not enabled, unit="step",
              dynamic_ncols=True, leave=True)


