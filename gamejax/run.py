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
from gamejax.data.pairs import PairLoader
from gamejax.data.prompts import PromptLoader
from gamejax.data.tokenizer import VOCAB_SIZE
from gamejax.evaluation import arena as arena_eval, heldout as heldout_eval, reward as reward_eval
from gamejax.models import llama, policy_value, reward
from gamejax.payoffs.base import Payoff
from gamejax.players import judges, policy, reference as reference_player


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


ANSWER_WIDTH = 19       # digits of the judge's answer key (arena answers fit int64)
PLAYERS = ("policy", "policy_value", "reward_model")
# Per-step event counts summed into the stage's summary (the last part of a metric's name ->
# summary key), found however the payoff nests (``agent/rloo/nonfinite_rewards`` under
# ``weighted``); checkpoints carry them, so a resumed stage goes on counting.
COUNTED = {"skipped_nonfinite": "skipped_nonfinite", "no_stop": "no_stop_completions",
           "nonfinite_rewards": "nonfinite_rewards"}
PAIR_SOURCES = ("arena_preferences",)


@dataclasses.dataclass(frozen=True)
class Rollout:
  """How the agent plays in a stage where it moves: ``group_size`` sampled completions of each
  prompt, judged by ``judge``."""
  group_size: int = 8
  max_new_tokens: int | None = None     # None: the agent's longest move in the arena's turns
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  prompt_len: int = 16
  # The judge: a responder, "arena" (the arena's verifiable judge, exact match; None means it
  # too) or "reward_model" (the final params of the stage named by ``judge_from``, frozen).
  judge: judges.Responder | str | None = None
  judge_from: str | None = None
  # Multi-turn games: the agent moves ``turns`` times; between its moves ``opponent`` replies
  # (``opponents.arena_feedback()``, ``opponents.fixed_reply(text)``); judges score the last move.
  turns: int = 1
  opponent: Any = None
  # Score at the sampler's temperature (the TRL / verl convention): the behaviour, the learner's
  # and the reference's log-probs are all of ``logits / temperature``, so the first update's
  # importance ratio is 1 and KL terms refer to the policy that sampled. False: all at
  # temperature 1 (gamejax 0.1), which scores the moves under another policy than the one that
  # sampled them whenever temperature != 1.
  score_at_temperature: bool = True

  @property
  def score_temperature(self) -> float:
    """The temperature the stage's log-probs are computed at."""
    return self.temperature if self.score_at_temperature else 1.0


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage: a game (its data and the agent's payoff) played for ``steps`` steps.

  Without ``rollout`` the moves are the data's game records (``batch_size`` packed rows of
  ``seq_len``); with it the agent samples its moves for ``batch_size`` prompts per step.
  Preference data (``arena_preferences``) gives ``batch_size / 2`` pairs per step.
  """
  name: str
  data: DataSpec
  payoff: Payoff
  steps: int
  batch_size: int = 32
  seq_len: int = 128
  optimizer: Optimizer = Optimizer()
  steps_per_call: int = 10
  checkpoint_every: int = 1000
  init_from: str | None = "previous"     # "previous", an earlier stage's name, or None (fresh)
  rollout: Rollout | None = None
  # With ``reference``, a frozen copy of the stage's initial params responds with its log-probs
  # of the agent's moves (for KL terms, DPO and IPO).
  reference: bool = False
  # "policy" (the LM), "policy_value" (the LM with a value head on its trunk: PPO's actor-critic)
  # or "reward_model" (the LM trunk with a scalar head, trunk initialised from ``init_from``'s
  # policy params when given).
  player: str = "policy"
  # ``prepare(params, play)`` runs once per step before the updates (``ppo_prepare()``); the step
  # makes ``epochs`` passes of ``minibatches`` updates over the moves.
  prepare: Any = None
  epochs: int = 1
  minibatches: int = 1


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
      folder = spec.params.get("path") if spec.name == "local_text" else None
      if folder is not None and not os.path.isdir(folder):
        raise ExperimentError(f"local_text.path={folder!r}: "
                              f"{'not a folder' if os.path.exists(folder) else 'no such folder'}")
    for i, s in enumerate(self.stages):
      _validate_stage(s, self.stages[:i])


def _validate_stage(s: Stage, earlier: Sequence[Stage]) -> None:
  for field in ("steps", "batch_size", "seq_len", "steps_per_call", "checkpoint_every",
                "epochs", "minibatches"):
    if getattr(s, field) <= 0:
      raise ExperimentError(f"Stage {s.name!r}: {field} must be positive, got {getattr(s, field)}")
  if s.steps % s.steps_per_call:
    raise ExperimentError(f"Stage {s.name!r}: steps={s.steps} is not a multiple of "
                          f"steps_per_call={s.steps_per_call}")
  if s.data.too_long not in ("truncate", "skip", "error"):
    raise ExperimentError(f"Stage {s.name!r}: data too_long={s.data.too_long!r}; expected "
                          "'truncate', 'skip' or 'error'")
  names = [e.name for e in earlier]
  if s.init_from not in (None, "previous", *names):
    raise ExperimentError(f"Stage {s.name!r}: init_from={s.init_from!r}; expected 'previous', "
                          f"None or an earlier stage's name ({names})")
  if s.player not in PLAYERS:
    raise ExperimentError(f"Stage {s.name!r}: player={s.player!r}; expected one of {PLAYERS}")
  if s.data.name in PAIR_SOURCES and s.batch_size % 2:
    raise ExperimentError(f"Stage {s.name!r}: batch_size={s.batch_size} must be even for "
                          f"preference pairs (chosen and rejected rows)")
  if s.player == "policy_value" and s.rollout is None:
    raise ExperimentError(f"Stage {s.name!r}: player='policy_value' (PPO) needs a rollout")
  if s.player == "reward_model" and (s.rollout is not None or s.reference):
    raise ExperimentError(f"Stage {s.name!r}: a reward model learns from preference records; "
                          "it takes no rollout or reference")
  if s.rollout is not None:
    _validate_rollout(s, earlier)


def _validate_rollout(s: Stage, earlier: Sequence[Stage]) -> None:
  r = s.rollout
  if r.judge == "reward_model":
    players = {e.name: e.player for e in earlier}
    if players.get(r.judge_from) != "reward_model":
      raise ExperimentError(f"Stage {s.name!r}: Rollout.judge='reward_model' needs judge_from "
                            f"naming an earlier reward_model stage; got {r.judge_from!r}")
  elif isinstance(r.judge, str) and r.judge != "arena":
    raise ExperimentError(f"Stage {s.name!r}: Rollout.judge={r.judge!r}; expected 'arena', "
                          "'reward_model' or a responder function")
  if r.judge in (None, "arena") and s.data.name != "arithmetic_arena":
    raise ExperimentError(f"Stage {s.name!r}: Rollout.judge must be set for dataset "
                          f"{s.data.name!r} (the default judge is the arena's)")
  if r.turns < 1 or (r.turns > 1) != (r.opponent is not None):
    raise ExperimentError(f"Stage {s.name!r}: Rollout.turns={r.turns} needs an opponent "
                          "exactly when turns > 1")
  if r.group_size < 1 or r.prompt_len < 1 or (r.max_new_tokens or 1) < 1:
    raise ExperimentError(f"Stage {s.name!r}: Rollout group_size, prompt_len and "
                          f"max_new_tokens must be positive; got {r}")
  if r.max_new_tokens is None and s.data.name != "arithmetic_arena":
    raise ExperimentError(f"Stage {s.name!r}: Rollout.max_new_tokens must be set for "
                          f"dataset {s.data.name!r} (only the arena implies it)")
  wanted = getattr(s.payoff, "group_size", None)
  if wanted is not None and wanted != r.group_size:
    raise ExperimentError(f"Stage {s.name!r}: the payoff groups {wanted} completions per "
                          f"prompt but Rollout.group_size={r.group_size}")
  if wanted is not None and s.minibatches > 1:
    raise ExperimentError(f"Stage {s.name!r}: minibatches={s.minibatches} would split the groups "
                          f"of {wanted} completions the payoff compares; use minibatches=1")


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


def stage_loader(exp: Experiment, index: int, source):
  """The stage's batches: packed game records, or prompts (with the arena's answer key)."""
  stage = exp.stages[index]
  seed = exp.seed * 1000 + index
  if stage.data.name in PAIR_SOURCES:
    return PairLoader(source, stage.batch_size // 2, stage.seq_len, seed=seed)
  if stage.rollout is None:
    return PackedLoader(source, stage.batch_size, stage.seq_len, seed=seed,
                        too_long=stage.data.too_long)
  width = ANSWER_WIDTH if stage.data.name == "arithmetic_arena" else 0
  return PromptLoader(source, stage.batch_size, stage.rollout.prompt_len, seed=seed,
                      answer_width=width)


def stage_game(exp: Experiment, index: int) -> game_step.Game:
  """The game of stage ``index``: the agent learns ``stage.payoff``; it reads records, or plays
  against a judge (and a frozen reference) when the stage has a ``rollout``."""
  stage, cfg = exp.stages[index], exp.model
  r = stage.rollout
  temperature = 1.0 if r is None else r.score_temperature
  apply = policy.at_temperature(functools.partial(llama.apply, cfg), temperature)
  learner_apply = {"policy": apply,
                   "policy_value": policy.at_temperature(functools.partial(policy_value.apply, cfg),
                                                         temperature),
                   "reward_model": functools.partial(reward.apply, cfg)}[stage.player]
  learner = game_step.Learner(apply=learner_apply, payoff=stage.payoff,
                              optimizer=stage.optimizer.build(stage.steps),
                              prepare=stage.prepare, epochs=stage.epochs,
                              minibatches=stage.minibatches)
  parts = [reference_player.reference(apply)] if stage.reference else []
  if r is None:
    respond = judges.responders(*parts) if parts else game_step.no_response
    return game_step.Game(learners={"agent": learner}, respond=respond)
  budget = r.max_new_tokens or arena_eval.answer_budget(dict(stage.data.params))
  play = policy.sampled_play(cfg, r.group_size, budget, r.temperature, r.top_k, r.top_p,
                             turns=r.turns, opponent=r.opponent,
                             params_of=policy_value.policy_params,
                             scaled_logprobs=r.score_at_temperature)
  if r.judge in (None, "arena"):
    judge = judges.arena_judge()
  elif r.judge == "reward_model":
    judge = judges.reward_model_judge(cfg, functools.partial(reward.apply, cfg))
  else:
    judge = r.judge
  return game_step.Game(learners={"agent": learner}, play=play,
                        respond=judges.responders(judge, *parts))


def stage_state(exp: Experiment, index: int, game: game_step.Game, params,
                judge_params=None) -> game_step.GameState:
  """The stage's initial state from the agent's ``params`` (also the frozen reference's) and,
  when its rollout is judged by a reward model, that model's ``judge_params``.

  Every leaf is a fresh copy: the step donates the state, and ``params`` may still be needed
  (another stage starts from them).
  """
  stage = exp.stages[index]
  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  frozen = {"reference": copy(policy_value.policy_params(params))} if stage.reference else {}
  if stage.rollout is not None and stage.rollout.judge == "reward_model":
    frozen[judges.JUDGE] = copy(judge_params)
  rng = jax.random.fold_in(jax.random.PRNGKey(exp.seed), index)
  return game_step.init_state(game, {"agent": copy(params)}, rng, frozen)


def initial_params(exp: Experiment, index: int, init_params=None):
  """The stage's starting params: ``init_params`` (from an earlier stage) or fresh ones; a reward
  model takes a policy's params as its trunk."""
  stage = exp.stages[index]
  rng = jax.random.fold_in(jax.random.PRNGKey(exp.seed), 10_000 + index)
  if init_params is not None and stage.player != "reward_model":
    init_params = policy_value.policy_params(init_params)
  if stage.player == "policy":
    return init_params if init_params is not None else llama.init_params(exp.model, rng)
  if stage.player == "policy_value":
    return policy_value.init_params(exp.model, rng, init_params)
  if init_params is not None and "head" in init_params:     # already a reward model
    return init_params
  params = reward.init_params(exp.model, rng)
  if init_params is not None:
    params["trunk"] = {k: v for k, v in init_params.items() if k != "lm_head"}
  return params


@dataclasses.dataclass
class StageResult:
  params: Any
  metrics: dict


def run_stage(exp: Experiment, index: int, init_params: Any, workdir: str, mesh,
              progress: bool = True, eval_examples=None, log: Callable[[str], None] = print,
              stop_after_steps: int | None = None, judge_params=None) -> StageResult:
  """Plays one stage from its latest checkpoint (if any) to ``stage.steps``."""
  stage = exp.stages[index]
  sharding.check_batch_size(mesh, stage.batch_size)
  data_dir = sources.resolve_data_dir(exp.data_dir)
  source = stage.data.load("train", data_dir)
  loader = stage_loader(exp, index, source)
  game = stage_game(exp, index)
  init_params = initial_params(exp, index, init_params)
  make_state = functools.partial(stage_state, exp, index, game, judge_params=judge_params)
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
    resumed_counts = dict(extra.get("counts", {}))
    log(f"[{stage.name}] resumed from step {start}")
  else:
    state = jax.jit(make_state, out_shardings=state_sharding)(init_params)
    resumed_counts = {}
    start = 0

  writer = MetricsWriter(os.path.join(workdir, "metrics.jsonl"))
  k = stage.steps_per_call
  end = stage.steps if stop_after_steps is None else min(stage.steps, stop_after_steps)
  bar = _progress(stage.name, start, stage.steps, progress)
  clock = Throughput()
  last_loss, pending, tokens = math.nan, None, 0
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
    writer.write(row)
    bar.update(k)
    bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row.get('tokens_per_s', 0):.0f}")

  try:
    for step_no in range(start + k, end + 1, k):
      batches = _stack([next(loader) for _ in range(k)])
      state, metrics = step_fn(state, jax.device_put(batches, batch_sharding))
      if pending is not None:
        flush(*pending)
      pending = (step_no, metrics)
      if step_no % stage.checkpoint_every == 0 and step_no < end:
        ckpt.save(step_no, state, {"data": loader.get_state(), "stage": stage.name,
                                   "counts": counts})
    if pending is not None:
      flush(*pending)
    if end > start:
      ckpt.save(end, state, {"data": loader.get_state(), "stage": stage.name, "counts": counts})
  finally:
    bar.close()
    writer.close()
    ckpt.close()

  params = state.params["agent"]
  result = {"steps": end, "loss": last_loss, **counts}
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
    result.update(evaluate_stage(exp, index, params, eval_examples))
  return StageResult(params=params, metrics=result)


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


def evaluate_stage(exp: Experiment, index: int, params: Any, examples=None) -> dict:
  """Held-out figures of a stage's params: a reward model's pair accuracy on its data's test
  split; a policy's arena accuracy on ``examples`` (none without an Evaluation) and, for a stage
  that imitates records, its held-out loss and perplexity on its data's test split."""
  stage = exp.stages[index]
  if stage.player == "reward_model":
    test = stage.data.load("test", sources.resolve_data_dir(exp.data_dir))
    return reward_eval.pair_accuracy(exp.model, params, test, stage.seq_len)
  policy_params = policy_value.policy_params(params)
  out = heldout(exp, index, policy_params)
  if examples is not None:
    out.update(evaluate(exp, policy_params, examples))
  return out


def heldout(exp: Experiment, index: int, params: Any) -> dict:
  """Held-out loss and perplexity of a stage that imitates records (no rollout, no pairs), on the
  test split of its data, scoring the players its payoff imitates (``payoff.players``; every
  player when the payoff does not say). Empty when the data holds no test records."""
  stage = exp.stages[index]
  if stage.rollout is not None or stage.data.name in PAIR_SOURCES:
    return {}
  data_dir = sources.resolve_data_dir(exp.data_dir)
  if not sources.has_split(stage.data.name, "test", data_dir, **dict(stage.data.params)):
    return {}
  test = stage.data.load("test", data_dir)
  if not len(test):
    return {}
  players = getattr(stage.payoff, "players", ("agent", "opponent"))
  return heldout_eval.heldout_loss(exp.model, params, test, players, stage.seq_len)


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
  params, finals = None, {}
  for i, stage in enumerate(exp.stages):
    init = params if stage.init_from == "previous" else finals.get(stage.init_from)
    judge = finals.get(stage.rollout.judge_from) if stage.rollout is not None else None
    if stage.name in summary and summary[stage.name].get("steps") == stage.steps:
      params = restore_params(exp, i, workdir, init)    # finished before: reuse its result
      finals[stage.name] = params
      log(f"[{stage.name}] already finished; reusing its final checkpoint")
      continue
    result = run_stage(exp, i, init, workdir, mesh, progress=progress, eval_examples=examples,
                       log=log, judge_params=judge)
    params = finals[stage.name] = result.params
    summary[stage.name] = result.metrics
    write_json_atomic(summary_path, summary)
  write_json_atomic(summary_path, summary)
  log(stage_table(exp, summary))
  return summary


def restore_params(exp: Experiment, index: int, workdir: str, init_params=None):
  """The params of stage ``index``'s latest checkpoint in ``workdir``."""
  stage = exp.stages[index]
  init_params = initial_params(exp, index, init_params)
  judge = None
  if stage.rollout is not None and stage.rollout.judge == "reward_model":
    judge = jax.eval_shape(functools.partial(reward.init_params, exp.model), jax.random.PRNGKey(0))
  game = stage_game(exp, index)
  abstract = jax.eval_shape(lambda p, j: stage_state(exp, index, game, p, judge_params=j),
                            init_params, judge)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints", stage.name), keep=exp.keep_checkpoints)
  try:
    state, _ = ckpt.restore(abstract)
  finally:
    ckpt.close()
  return state.params["agent"]


def describe_stages(exp: Experiment) -> str:
  """One line per stage: what it plays, how long, from what (``gamejax train --dry_run``)."""
  lines = []
  for i, s in enumerate(exp.stages):
    game = "records" if s.rollout is None else (
        f"plays: {s.rollout.group_size} per prompt, temperature {s.rollout.temperature} "
        f"(scored at {s.rollout.score_temperature}), judge "
        f"{s.rollout.judge if isinstance(s.rollout.judge, str) else s.rollout.judge or 'arena'}"
        + (f", {s.rollout.turns} turns" if s.rollout.turns > 1 else ""))
    payoff = getattr(s.payoff, "__qualname__", type(s.payoff).__name__).split(".<locals>")[0]
    init = {None: "fresh", "previous": "previous stage"}.get(s.init_from, s.init_from)
    lines.append(f"  {i + 1}. {s.name}: {s.player}, payoff {payoff}, {s.steps} steps x "
                 f"{s.batch_size} x {s.seq_len}, data {s.data.name}, {game}, from {init}"
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
