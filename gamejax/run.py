"""Running an experiment: a sequence of stages, each a game played by the one compiled step.

An ``Experiment`` is plain data (built by gin at the edge, or in Python): a model config, stages
(pre-training, SFT, ...) and a held-out evaluation. ``run_experiment`` plays each stage: it streams
game records from the stage's data, runs K compiled game steps per host call, reads metrics one
call late, checkpoints params + optimizer + RNG + data-iterator state, evaluates, and hands the
final params to the next stage.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gamejax import sharding, step as game_step
from gamejax.checkpoint import Checkpointer
from gamejax.data import sources
from gamejax.data.loader import PackedLoader
from gamejax.data.tokenizer import VOCAB_SIZE
from gamejax.evaluation import arena as arena_eval
from gamejax.models import llama
from gamejax.payoffs.base import Payoff


class ExperimentError(ValueError):
  """An experiment description that cannot run (bad sizes, names, combinations)."""


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """A registered data source (``sources.load_source``) and its build parameters."""
  name: str
  params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  too_long: str = "truncate"     # a record longer than seq_len: "truncate", "skip" or "error"

  def load(self, split: str, data_dir: str):
    return sources.load_source(self.name, split, data_dir, **dict(self.params))


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """AdamW with warmup + cosine decay and global-norm clipping."""
  learning_rate: float = 3e-3
  warmup_steps: int = 50
  end_factor: float = 0.1
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.98
  grad_clip: float = 1.0

  def build(self, total_steps: int) -> optax.GradientTransformation:
    warmup = min(self.warmup_steps, max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, self.learning_rate, warmup, max(total_steps, warmup + 1),
        end_value=self.learning_rate * self.end_factor)
    return optax.chain(optax.clip_by_global_norm(self.grad_clip),
                       optax.adamw(schedule, self.b1, self.b2, weight_decay=self.weight_decay))


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage: a game (its data and the agent's payoff) played for ``steps`` steps."""
  name: str
  data: DataSpec
  payoff: Payoff
  steps: int
  batch_size: int = 32
  seq_len: int = 128
  optimizer: Optimizer = Optimizer()
  steps_per_call: int = 10
  checkpoint_every: int = 1000
  init_from: str | None = "previous"     # "previous": the last stage's final params; None: fresh


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """Held-out exact-match accuracy of greedy answers on the test split of an arena dataset."""
  data: DataSpec
  num_examples: int = 500
  max_new_tokens: int | None = None     # None: the agent's longest move in the arena's turns
  batch_size: int = 250
  reference_players: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Experiment:
  stages: Sequence[Stage]
  model: llama.LlamaConfig
  evaluation: Evaluation | None = None
  seed: int = 0
  data_dir: str | None = None          # None: $GAMEJAX_DATA_DIR or ~/.cache/gamejax/datasets
  mesh_data: int = -1
  mesh_fsdp: int = 1
  keep_checkpoints: int = 2

  def validate(self) -> None:
    names = [s.name for s in self.stages]
    if not names:
      raise ExperimentError("Experiment.stages is empty: give at least one Stage")
    if len(set(names)) != len(names):
      raise ExperimentError(f"Experiment.stages: stage names must be unique, got {names}")
    if self.model.vocab_size < VOCAB_SIZE:
      raise ExperimentError(f"LlamaConfig.vocab_size={self.model.vocab_size} is smaller than the "
                            f"byte tokenizer's {VOCAB_SIZE} ids")
    specs = [s.data for s in self.stages] + ([self.evaluation.data] if self.evaluation else [])
    for spec in specs:
      if spec.name not in sources.SOURCES:
        close = difflib.get_close_matches(spec.name, list(sources.SOURCES), n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ExperimentError(f"unknown dataset {spec.name!r}.{hint} Known: {sorted(sources.SOURCES)}")
    for s in self.stages:
      for field in ("steps", "batch_size", "seq_len", "steps_per_call", "checkpoint_every"):
        if getattr(s, field) <= 0:
          raise ExperimentError(f"Stage {s.name!r}: {field} must be positive, got {getattr(s, field)}")
      if s.steps % s.steps_per_call:
        raise ExperimentError(f"Stage {s.name!r}: steps={s.steps} is not a multiple of "
                              f"steps_per_call={s.steps_per_call}")
      if s.data.too_long not in ("truncate", "skip", "error"):
        raise ExperimentError(f"Stage {s.name!r}: data too_long={s.data.too_long!r}; expected "
                              "'truncate', 'skip' or 'error'")
      if s.init_from not in (None, "previous"):
        raise ExperimentError(f"Stage {s.name!r}: init_from={s.init_from!r}; expected 'previous' or None")


# ----------------------------------------------------------------------------------------------
# Host-side I/O of a run directory.

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


# ----------------------------------------------------------------------------------------------
# Playing one stage.

def _stack(batches: Sequence[Mapping[str, np.ndarray]]) -> dict:
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


@dataclasses.dataclass
class StageResult:
  params: Any
  metrics: dict


def run_stage(exp: Experiment, index: int, init_params: Any, workdir: str, mesh,
              progress: bool = True, eval_examples=None, log: Callable[[str], None] = print,
              stop_after_steps: int | None = None) -> StageResult:
  """Plays one stage from its latest checkpoint (if any) to ``stage.steps``."""
  stage = exp.stages[index]
  cfg = exp.model
  sharding.check_batch_size(mesh, stage.batch_size)
  data_dir = sources.resolve_data_dir(exp.data_dir)
  source = stage.data.load("train", data_dir)
  loader = PackedLoader(source, stage.batch_size, stage.seq_len, seed=exp.seed * 1000 + index,
                        too_long=stage.data.too_long)
  learner = game_step.Learner(apply=functools.partial(llama.apply, cfg), payoff=stage.payoff,
                              optimizer=stage.optimizer.build(stage.steps))
  game = game_step.Game(learners={"agent": learner})
  rng = jax.random.PRNGKey(exp.seed)
  stage_rng = jax.random.fold_in(rng, index)
  if init_params is None:
    init_params = llama.init_params(cfg, jax.random.fold_in(rng, 10_000 + index))

  make_state = lambda p: game_step.init_state(game, {"agent": p}, stage_rng)
  abstract = jax.eval_shape(make_state, init_params)
  step_fn, state_sharding = game_step.make_step(game, mesh, abstract)
  batch_sharding = sharding.batch_sharding(mesh, leading=1)

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints", stage.name), keep=exp.keep_checkpoints)
  start = ckpt.latest_step()
  if start is not None:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, state_sharding)
    state, extra = ckpt.restore(target)
    loader.set_state(extra["data"])
    log(f"[{stage.name}] resumed from step {start}")
  else:
    state = jax.jit(make_state, out_shardings=state_sharding)(init_params)
    start = 0

  writer = MetricsWriter(os.path.join(workdir, "metrics.jsonl"))
  k = stage.steps_per_call
  end = stage.steps if stop_after_steps is None else min(stage.steps, stop_after_steps)
  bar = _progress(stage.name, start, stage.steps, progress)
  clock = Throughput()
  last_loss, pending, tokens = math.nan, None, 0

  def flush(step_no, metrics, tokens_through):
    """Logs a call's metrics once the next call is queued, so reading them never stalls."""
    nonlocal last_loss
    row = {"stage": stage.name, "step": step_no}
    row.update({key: float(np.mean(v)) for key, v in jax.device_get(metrics).items()})
    rate = clock.mark(tokens_through)
    if math.isfinite(rate):              # the first read has no interval before it
      row["tokens_per_s"] = rate
    last_loss = row["loss"]
    writer.write(row)
    bar.update(k)
    bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row.get('tokens_per_s', 0):.0f}")

  try:
    for step_no in range(start + k, end + 1, k):
      batches = _stack([next(loader) for _ in range(k)])
      tokens += int((batches["segment_ids"] > 0).sum())
      state, metrics = step_fn(state, jax.device_put(batches, batch_sharding))
      if pending is not None:
        flush(*pending)
      pending = (step_no, metrics, tokens)
      if step_no % stage.checkpoint_every == 0 and step_no < end:
        ckpt.save(step_no, state, {"data": loader.get_state(), "stage": stage.name})
    if pending is not None:
      flush(*pending)
    if end > start:
      ckpt.save(end, state, {"data": loader.get_state(), "stage": stage.name})
  finally:
    bar.close()
    writer.close()
    ckpt.close()

  params = state.params["agent"]
  result = {"steps": end, "loss": last_loss, "truncated": loader.stats["truncated"],
            "skipped": loader.stats["skipped"]}
  if clock.steady_rate() is not None:
    result["tokens_per_s"] = clock.steady_rate()
  if loader.stats["truncated"] or loader.stats["skipped"]:
    log(f"[{stage.name}] records longer than seq_len={stage.seq_len}: "
        f"{loader.stats['truncated']} truncated, {loader.stats['skipped']} skipped")
  if eval_examples is not None and end == stage.steps:
    result.update(evaluate(exp, params, eval_examples))
  return StageResult(params=params, metrics=result)


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


# ----------------------------------------------------------------------------------------------
# Evaluation and the pipeline.

def load_eval_examples(exp: Experiment) -> list[dict] | None:
  ev = exp.evaluation
  if ev is None:
    return None
  source = ev.data.load("test", sources.resolve_data_dir(exp.data_dir))
  n = min(ev.num_examples, len(source))
  if n == 0:
    raise ExperimentError(f"Evaluation: the test split of {ev.data.name!r} is empty")
  return [source[i] for i in range(n)]


def evaluate(exp: Experiment, params: Any, examples: Sequence[dict]) -> dict:
  ev = exp.evaluation
  budget = ev.max_new_tokens or arena_eval.answer_budget(dict(ev.data.params))
  return arena_eval.agent_accuracy(exp.model, params, examples, budget, ev.batch_size)


def reference_accuracies(exp: Experiment, examples: Sequence[dict]) -> dict:
  return {label: arena_eval.player_accuracy(spec, examples, seed=exp.seed)
          for label, spec in exp.evaluation.reference_players.items()}


def prepare_data(exp: Experiment) -> None:
  """Builds (once) and opens every split the experiment reads, so bad data fails before a run."""
  data_dir = sources.resolve_data_dir(exp.data_dir)
  for s in exp.stages:
    s.data.load("train", data_dir)
  if exp.evaluation is not None:
    exp.evaluation.data.load("test", data_dir)


def run_experiment(exp: Experiment, workdir: str, progress: bool = True,
                   log: Callable[[str], None] = print) -> dict:
  """Plays every stage in order, resuming finished and interrupted stages from ``workdir``."""
  exp.validate()
  mesh = sharding.make_mesh(exp.mesh_data, exp.mesh_fsdp)
  summary_path = os.path.join(workdir, "summary.json")
  summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
  examples = load_eval_examples(exp)
  if examples is not None:
    summary.update(reference_accuracies(exp, examples))
  params = None
  for i, stage in enumerate(exp.stages):
    init = params if stage.init_from == "previous" else None
    if stage.name in summary and summary[stage.name].get("steps") == stage.steps:
      params = restore_params(exp, i, workdir, init)    # finished before: reuse its result
      log(f"[{stage.name}] already finished; reusing its final checkpoint")
      continue
    result = run_stage(exp, i, init, workdir, mesh, progress=progress, eval_examples=examples,
                       log=log)
    params = result.params
    summary[stage.name] = result.metrics
    write_json_atomic(summary_path, summary)
  write_json_atomic(summary_path, summary)
  log(stage_table(exp, summary))
  return summary


def restore_params(exp: Experiment, index: int, workdir: str, init_params=None):
  """The params of stage ``index``'s latest checkpoint in ``workdir``."""
  cfg = exp.model
  stage = exp.stages[index]
  if init_params is None:
    init_params = llama.init_params(cfg, jax.random.PRNGKey(0))
  learner = game_step.Learner(functools.partial(llama.apply, cfg), stage.payoff,
                              stage.optimizer.build(stage.steps))
  game = game_step.Game(learners={"agent": learner})
  abstract = jax.eval_shape(lambda p: game_step.init_state(game, {"agent": p},
                                                           jax.random.PRNGKey(0)), init_params)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints", stage.name), keep=exp.keep_checkpoints)
  try:
    state, _ = ckpt.restore(abstract)
  finally:
    ckpt.close()
  return state.params["agent"]


def stage_table(exp: Experiment, summary: Mapping[str, Any]) -> str:
  rows = [("stage", "held-out acc", "loss", "tokens/s", "steps")]
  for label in (exp.evaluation.reference_players if exp.evaluation else {}):
    r = summary.get(label, {})
    rows.append((f"{label} ({r.get('player', '?')})", _fmt(r.get("accuracy")), "-", "-", "-"))
  for s in exp.stages:
    r = summary.get(s.name, {})
    rows.append((s.name, _fmt(r.get("accuracy")), _fmt(r.get("loss")),
                 _fmt(r.get("tokens_per_s"), "{:.0f}"), str(r.get("steps", "-"))))
  widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
  lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def _fmt(x, pattern="{:.4f}"):
  return "-" if x is None else pattern.format(x)
