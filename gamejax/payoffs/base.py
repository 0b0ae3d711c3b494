"""What a payoff is: a pure function of a player's params and the play it is judged on.

A payoff returns a scalar the player *maximises* and a dict of named metrics:

    payoff(params, play: Play) -> (value, metrics)

``Play`` bundles what the game step knows when it scores a player: the player's pure ``apply``
(``apply(params, tokens, positions, segment_ids) -> logits_BTV``), the moves (a ``GameRecord``),
the opponent's judgments (a dict; empty when the opponent is a data source), a PRNG key and the
frozen players' params.
Payoffs are plain Python: they import neither the step, gin nor checkpointing.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from gamejax import records
from gamejax.models import logprobs
from gamejax.records import GameRecord

Metrics = Mapping[str, jax.Array]


class Play(NamedTuple):
  apply: Callable[..., jax.Array]
  moves: GameRecord
  judgments: Mapping[str, Any]
  rng: jax.Array
  # The players that do not learn (``GameState.frozen``: a magnet, a reference), read by payoffs
  # that evaluate them in the learner's own ``apply`` (MMD's magnet). Constants: no gradient.
  frozen: Mapping[str, Any] = {}


Payoff = Callable[[Any, Play], tuple[jax.Array, Metrics]]


def apply_moves(apply: Callable[..., Any], params: Any, moves: GameRecord, **options) -> Any:
  """``apply``'s output on ``moves``; where the record says what its rows share
  (``moves.shared_prompt``), ``apply`` is told (``shared_prompt=``), and a language model then
  computes each group's prompt once (``gamejax.models.shared_prompt``)."""
  if moves.shared_prompt is not None:
    options = {**options, "shared_prompt": moves.shared_prompt}
  return apply(params, moves.tokens, moves.positions, moves.segment_ids, **options)


def moves_logits(apply: Callable[..., Any], params: Any, moves: GameRecord) -> jax.Array:
  """``float32[B, T, V]``: ``apply``'s next-token logits of ``moves`` (an actor-critic's values
  dropped)."""
  out = apply_moves(apply, params, moves)
  return (out[0] if isinstance(out, tuple) else out).astype(jnp.float32)


def token_logprobs(apply: Callable[..., Any], params: Any, moves: GameRecord,
                   sampled_only: bool = False) -> logprobs.Scored:
  """``Scored(logprobs, argmax, entropy)``, each ``[B, T]``: at ``t``, log p(token ``t+1``) under
  ``apply``, its greedy next token and the distribution's entropy. An apply that reads targets
  (``lm.bind`` of a config with ``logits_chunk``) computes them block by block without the
  ``[B, T, V]`` logits (``gamejax.models.logprobs``); any other apply's logits are scored whole.

  ``sampled_only``: the caller reads them only where a token sampled in the game follows (an RL
  payoff, the reference's log-probs for its KL). An apply that reads targets then skips the
  record's opening (``GameRecord.opening``: a sampled play's prompts): no LM head over the prompt
  positions, forward or backward, and 0 there."""
  if logprobs.reads_targets(apply):
    return apply_moves(apply, params, moves, **target_options(moves, sampled_only))
  return logprobs.score(moves_logits(apply, params, moves), records.next_tokens(moves))


def target_options(moves: GameRecord, sampled_only: bool) -> dict:
  """The options that make an apply reading targets score ``moves``: ``targets`` (each position's
  next token) and, for a reader of sampled moves alone, ``scored_from`` (the record's opening
  skipped: position ``opening - 1`` predicts the first move)."""
  options = {"targets": records.next_tokens(moves)}
  if sampled_only and moves.opening > 1:
    options["scored_from"] = moves.opening - 1
  return options


def frozen_player(play: Play, name: str, what: str) -> Any:
  """The params of frozen player ``name`` in ``play`` (constants: no gradient), or a KeyError
  naming ``what`` reads it and the frozen players there are."""
  if name not in play.frozen:
    raise KeyError(f"{what}: no frozen player {name!r}; the frozen players are "
                   f"{sorted(play.frozen)}")
  return jax.lax.stop_gradient(play.frozen[name])
