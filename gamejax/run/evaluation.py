"""Held-out figures of a stage's final players: a policy's arena accuracy and held-out loss, a
reward model's pair accuracy, a game's exact evaluation (a matrix game's exploitability)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from gamejax import step as game_step
from gamejax.data import sources
from gamejax.data.prompts import opening_move
from gamejax.evaluation import arena as arena_eval, heldout as heldout_eval, reward as reward_eval
from gamejax.games import arithmetic
from gamejax.players import verifiers
from gamejax.run import assembly
from gamejax.run.schema import PAIR_SOURCES, Experiment, ExperimentError

def evaluate_stage(exp: Experiment, index: int, players: Mapping[str, Any], examples=None,
                   frozen: Mapping[str, Any] | None = None) -> dict:
  """Held-out figures of a stage's final ``players`` (learner name -> params): a game stage's
  exact evaluation by its game, with its followers' ``frozen`` params (e.g. exploitability); a
  reward model's pair accuracy on its data's test split; a policy's arena accuracy on
  ``examples`` (none without an Evaluation) and, for a stage that imitates records, its held-out
  loss and perplexity on its data's test split."""
  stage = exp.stages[index]
  if stage.game is not None and hasattr(stage.game, "evaluate_run"):    # a game of text
    return stage.game.evaluate_run(exp.model, seated_players(exp, index, players, frozen),
                                   dict(frozen or {}), examples, seed=exp.seed)
  if stage.game is not None:
    return stage.game.evaluate(assembly.learner_apply(exp, stage, "policy"),
                               seated_players(exp, index, players, frozen))
  params = players["agent"]
  if stage.player == "reward_model":
    test = stage.data.load("test", sources.resolve_data_dir(exp.data_dir))
    return reward_eval.pair_accuracy(exp.model, params, test, stage.seq_len)
  policy_params = assembly.policies_of(exp, index, players)["agent"]
  out = heldout(exp, index, policy_params)
  if examples is not None:
    out.update(evaluate(exp, policy_params, examples))
  return out


def seated_players(exp: Experiment, index: int, players: Mapping[str, Any],
                   frozen: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """A game stage's seats -> the params (or mixture, or league) of the player sitting there."""
  stage = exp.stages[index]
  state = game_step.GameState(params=dict(players), opt_state={}, frozen=dict(frozen or {}),
                              rng=None, step=None)
  return {seat: game_step.player_params(state, who) for seat, who in stage.seated.items()}


def export_policy(exp: Experiment, index: int, players: Mapping[str, Any], path: str,
                  frozen: Mapping[str, Any] | None = None) -> None:
  """Writes the seated players' policy (the game's format, e.g. Kuhn's OpenSpiel table)."""
  stage = exp.stages[index]
  stage.game.export_policy(assembly.learner_apply(exp, stage, "policy"),
                           seated_players(exp, index, players, frozen), path)


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
  players = ("agent",) if stage.spin is not None else getattr(stage.payoff, "players",
                                                              ("agent", "opponent"))
  return heldout_eval.heldout_loss(exp.model, params, test, players, stage.seq_len)


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
  """Held-out accuracy of greedy answers. On records that carry their outcome, ``accuracy`` is
  conditioned on the right tag, ``given_wrong`` holds the figures conditioned on the wrong one
  (with the reference players' errors it reproduces)."""
  ev = exp.evaluation
  if ev.verifier is not None:
    return verified(exp, params, examples)
  budget = ev.max_new_tokens or arena_eval.answer_budget(dict(ev.data.params))
  tags = arithmetic.outcome_tags(ev.data.params.get("outcome_tag", False))
  accuracy = lambda prompts=None: arena_eval.agent_accuracy(exp.model, params, examples, budget,
                                                          ev.batch_size, prompts)
  if tags is None:
    out = accuracy()
    out.pop("answers")
    return out
  out = accuracy(arena_eval.tagged_prompts(examples, tags, tags[0]))
  wrong = accuracy(arena_eval.tagged_prompts(examples, tags, tags[1]))
  wrong["reproduces"] = arena_eval.reproduced_flaws(examples, wrong.pop("answers"),
                                                    ev.reference_players, seed=exp.seed)
  out.pop("answers")
  out.update(conditioned_on=tags[0], given_wrong=wrong)
  return out


def verified(exp: Experiment, params: Any, examples: Sequence[dict]) -> dict:
  """The verifier's mean score (``accuracy``) of the greedy answers to ``examples``' prompts (the
  opponent's opening move of each local_text record), its errors counted apart."""
  ev = exp.evaluation
  tok = exp.text_tokenizer
  prompts = [opening_move(e["tokens"], e["players"]) for e in examples]
  texts, unstopped = arena_eval.greedy_answers(exp.model, params, prompts, ev.max_new_tokens,
                                               ev.batch_size, tok)
  fn = verifiers.resolve(ev.verifier.path)
  prompt_of = verifiers.local_text_prompts(examples, ev.data.params["path"])
  scores, errors = [], 0
  for i, text in enumerate(texts):
    try:
      value = float(fn(prompt_of(i), text))
      if not np.isfinite(value):
        raise ValueError(value)
      scores.append(value)
    except Exception:              # the user's code: counted, left out of the mean
      errors += 1
  return {"accuracy": float(np.mean(scores)) if scores else float("nan"),
          "verifier_errors": errors, "unstopped": unstopped, "examples": len(texts)}


def reference_accuracies(exp: Experiment, examples: Sequence[dict]) -> dict:
  return {label: arena_eval.player_accuracy(spec, examples, seed=exp.seed)
          for label, spec in exp.evaluation.reference_players.items()}


