"""The pipeline: an experiment's stages played in order, each starting from the earlier ones'
players, resumed from (or reusing) what a run directory already holds; its description and its
table of results."""
from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any, Callable, Mapping

import jax

from gamejax import sharding
from gamejax.checkpoint import CheckpointError, Checkpointer
from gamejax.data import sources
from gamejax.models import lm, reward
from gamejax.run import assembly, faults
from gamejax.run.evaluation import load_eval_examples, reference_accuracies
from gamejax.run.loop import run_stage, write_json_atomic
from gamejax.run.schema import Experiment

def prepare_data(exp: Experiment) -> None:
  """Builds (once) and opens every split the experiment reads, so bad data fails before a run."""
  data_dir = sources.resolve_data_dir(exp.data_dir)
  for s in exp.stages:
    if s.data is not None:
      source = s.data.load("train", data_dir)
      if assembly.packs_records(s) and hasattr(source, "lengths"):
        source.lengths()      # counted once here (process 0 first), kept beside the data
  if exp.evaluation is not None:
    exp.evaluation.data.load("test", data_dir)


def run_experiment(exp: Experiment, workdir: str, progress: bool = True,
                   log: Callable[[str], None] = print) -> dict:
  """Plays every stage in order, resuming finished and interrupted stages from ``workdir``."""
  exp.validate()
  exp.check_mesh()          # the mesh settings against this run's devices
  mesh = sharding.make_mesh(exp.mesh_data, exp.mesh_fsdp, exp.mesh_tensor)
  summary_path = os.path.join(workdir, "summary.json")
  summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
  examples = load_eval_examples(exp)
  if examples is not None:
    summary.update(reference_accuracies(exp, examples))
  finals = {}          # stage name -> its learners' final params, by name
  write = write_json_atomic if jax.process_index() == 0 else lambda *_: None
  with faults.PreemptionWatch() as preemption:       # SIGTERM: save, then Preempted
    for i, stage in enumerate(exp.stages):
      judge = None
      if stage.rollout is not None and stage.rollout.judge_from is not None:
        judge = finals.get(stage.rollout.judge_from, {}).get("agent")
      if stage.name in summary and summary[stage.name].get("steps") == stage.steps:
        finals[stage.name] = restore_params(exp, i, workdir)   # finished: reuse its result
        log(f"[{stage.name}] already finished; reusing its final checkpoint")
        continue
      result = run_stage(exp, i, finals, workdir, mesh, progress=progress,
                         eval_examples=examples, log=log, judge_params=judge,
                         preemption=preemption)
      finals[stage.name] = result.params
      summary[stage.name] = result.metrics
      write(summary_path, summary)
  write(summary_path, summary)
  log(stage_table(exp, summary))
  return summary


def restore_players(exp: Experiment, index: int, workdir: str) -> tuple[dict, dict]:
  """``(learners' params by name, frozen players by name)`` of stage ``index``'s latest
  checkpoint in ``workdir``, on this process's first device (whatever mesh and processes wrote
  it: orbax reshards)."""
  stage = exp.stages[index]
  judge = None
  if stage.rollout is not None and stage.rollout.judge == "reward_model":
    judge = jax.eval_shape(functools.partial(reward.init_params, exp.model), jax.random.PRNGKey(0))
  game = assembly.stage_game(exp, index)
  abstract = jax.eval_shape(
      lambda j: assembly.stage_state(exp, index, game, assembly.initial_players(exp, index),
                                     judge_params=j,
                                     earlier=assembly.earlier_players(exp, index)), judge)
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=here),
                          abstract)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints", stage.name), keep=exp.keep_checkpoints,
                      constant=assembly.constant_players(exp, index),
                      fused=lm.fused_storage(exp.model))
  try:
    restored = ckpt.restore_latest(abstract, log=lambda line: print(line, file=sys.stderr))
  finally:
    ckpt.close()
  if restored is None:
    raise CheckpointError(f"no checkpoint of stage {stage.name!r} in {ckpt.directory}")
  return dict(restored[1].params), dict(restored[1].frozen)


def restore_params(exp: Experiment, index: int, workdir: str) -> dict:
  """The learners' params (by name) of stage ``index``'s latest checkpoint in ``workdir``, as
  their models read them (LoRA adapters merged into their base)."""
  return assembly.resolved_players(*restore_players(exp, index, workdir))


def _payoff_name(payoff) -> str:
  return getattr(payoff, "__qualname__", type(payoff).__name__).split(".<locals>")[0]


def describe_stages(exp: Experiment) -> str:
  """One line per stage: what it plays, how long, from what (``gamejax train --dry_run``)."""
  lines = []
  for i, s in enumerate(exp.stages):
    if s.game is not None:
      who = ", ".join(
          f"{name} ({p.model}, payoff {_payoff_name(p.payoff)}, from "
          f"{ {None: 'fresh', 'previous': 'previous stage'}.get(p.init_from, p.init_from)})"
          for name, p in s.players.items())
      seats = ", ".join(f"{seat}: {s.seats[seat] if seat in s.scripted else who_}"
                        for seat, who_ in s.seated.items())
      followers = ", ".join(f"{n} = {f.kind} of {f.learner}" for n, f in s.all_followers.items())
      earlier = ", ".join(f"{n} = {src}'s" for n, src in s.frozen_from.items())
      lines.append(f"  {i + 1}. {s.name}: game {getattr(s.game, 'name', type(s.game).__name__)}, "
                   f"{s.steps} steps x {s.batch_size} games; learners {who}; seats {seats}"
                   + (f"; followers {followers}" if followers else "")
                   + (f"; frozen {earlier}" if earlier else ""))
      continue
    game = "records" if s.rollout is None and s.spin is None else (
        f"self-play against the previous iterate: {s.spin.iterations} iterations of "
        f"{s.steps // s.spin.iterations} steps, its answers sampled at temperature "
        f"{s.spin.temperature}") if s.rollout is None else (
        f"plays: {s.rollout.group_size} per prompt, temperature {s.rollout.temperature} "
        f"(scored at {s.rollout.score_temperature}), judge "
        f"{_payoff_name(s.rollout.judge) if callable(s.rollout.judge) else s.rollout.judge or 'arena'}"
        + (f", versus {s.rollout.versus}" if s.rollout.versus is not None else "")
        + (f", {s.rollout.turns} turns" if s.rollout.turns > 1 else ""))
    init = {None: "fresh", "previous": "previous stage"}.get(s.init_from, s.init_from)
    lines.append(f"  {i + 1}. {s.name}: {s.player}, payoff {_payoff_name(s.payoff)}, {s.steps} "
                 f"steps x {s.batch_size} x {s.seq_len}, data {s.data.name}, {game}, from {init}"
                 + (", frozen reference" if s.reference else ""))
  return "\n".join(lines)


def stage_table(exp: Experiment, summary: Mapping[str, Any]) -> str:
  rows = [("stage", "held-out acc", "held-out loss (ppl)", "loss", "tokens/s", "steps")]
  for label in (exp.evaluation.reference_players if exp.evaluation else {}):
    r = summary.get(label, {})
    rows.append((f"{label} ({r.get('player', '?')})", _fmt(r.get("accuracy")), "-", "-", "-",
                 "-"))
  for s in exp.stages:
    r = summary.get(s.name, {})
    held_out = (_fmt(r.get("pair_accuracy")) + " (pairs)" if "pair_accuracy" in r
                else _fmt(r.get("exploitability")) + " (exploitability)" if "exploitability" in r
                else _fmt(r.get("accuracy")))
    loss = ("-" if r.get("heldout_loss") is None else
            f"{r['heldout_loss']:.4f} ({r['heldout_perplexity']:.3f})")
    rows.append((s.name, held_out, loss, _fmt(r.get("loss")),
                 _fmt(r.get("tokens_per_s"), "{:.0f}"), str(r.get("steps", "-"))))
  widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
  lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def _fmt(x, pattern="{:.4f}"):
  return "-" if x is None else pattern.format(x)
