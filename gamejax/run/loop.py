"""The loop: one stage played from its latest checkpoint to its last step.

Batches stream from the stage's loader, K compiled game steps run per host call, metrics are read
one call late (so reading them never stalls the device) and appended to ``metrics.jsonl``,
checkpoints carry every learner's params and optimizer state, the followers, the RNG, the loader's
position and the counted events.
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

from gamejax import sharding, step as game_step
from gamejax.checkpoint import Checkpointer
from gamejax.data import sources
from gamejax.run import assembly, evaluation
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
  """Appends one JSON object per logged step to ``metrics.jsonl``."""

  def __init__(self, path: str):
    self._f = open(path, "a")

  def write(self, row: Mapping[str, Any]) -> None:
    self._f.write(json.dumps({k: _to_python(v) if not isinstance(v, str) else v
                              for k, v in row.items()}) + "\n")
    self._f.flush()

  def close(self):
    self._f.close()


def _stack(batches: Sequence[Mapping[str, np.ndarray]]) -> dict:
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


@dataclasses.dataclass
class StageResult:
  params: dict          # each learner's final params, by name (LoRA learners' merged)
  metrics: dict


def run_stage(exp: Experiment, index: int, finals: Mapping[str, Any] | None, workdir: str, mesh,
              progress: bool = True, eval_examples=None, log: Callable[[str], None] = print,
              stop_after_steps: int | None = None, judge_params=None) -> StageResult:
  """Plays one stage from its latest checkpoint (if any) to ``stage.steps``; its learners start
  from ``finals`` (earlier stages' final params by stage name, then learner name; None: fresh)."""
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
                      constant=assembly.constant_players(exp, index))
  start = ckpt.latest_step()
  accuracy_at = {}             # held-out accuracy every eval_every steps: "step" -> accuracy
  if start is not None:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, state_sharding)
    state, extra = ckpt.restore(target)
    loader.set_state(extra["data"])
    resumed_counts = dict(extra.get("counts", {}))
    accuracy_at.update(extra.get("accuracy_at", {}))
    log(f"[{stage.name}] resumed from step {start}")
  else:
    state = jax.jit(make_state, out_shardings=state_sharding)(init_players)
    resumed_counts = {}
    start = 0

  writer = MetricsWriter(os.path.join(workdir, "metrics.jsonl"))
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
    for label, n in count_events(metrics).items():
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

  def evaluate_now(state, step_no) -> float:
    """Held-out accuracy of the agent's current policy, logged as ``eval/accuracy``."""
    players = assembly.resolved_players(state.params, state.frozen)
    policy_params = assembly.policies_of(exp, index, players)["agent"]
    figures = evaluation.evaluate(exp, policy_params, eval_examples)
    writer.write({"stage": stage.name, "step": step_no, "eval/accuracy": figures["accuracy"]})
    log(f"[{stage.name}] step {step_no}: held-out accuracy {figures['accuracy']:.4f}")
    return figures["accuracy"]

  try:
    if stage.eval_at_start and start == 0 and "0" not in accuracy_at:
      accuracy_at["0"] = evaluate_now(state, 0)
    for step_no in range(start + k, end + 1, k):
      batches = _stack([next(loader) for _ in range(k)])
      state, metrics = step_fn(state, jax.device_put(batches, batch_sharding))
      if pending is not None:
        flush(*pending)
      pending = (step_no, metrics)
      if stage.eval_every and step_no % stage.eval_every == 0 and step_no < stage.steps:
        flush(*pending)
        pending = None
        accuracy_at[str(step_no)] = evaluate_now(state, step_no)
      if step_no % stage.checkpoint_every == 0 and step_no < end:
        ckpt.save(step_no, state, {"data": loader.get_state(), "stage": stage.name,
                                   "counts": counts, "accuracy_at": accuracy_at})
    if pending is not None:
      flush(*pending)
    if end > start:
      ckpt.save(end, state, {"data": loader.get_state(), "stage": stage.name, "counts": counts,
                             "accuracy_at": accuracy_at})
  finally:
    bar.close()
    writer.close()
    ckpt.close()
  frozen = dict(state.frozen)
  players = assembly.resolved_players(state.params, frozen)   # LoRA adapters merged
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


