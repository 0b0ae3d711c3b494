"""Head to head: the agent and another player answer the same prompts, and a judge compares them.

``versus_play(agent_play, opponent_play)`` runs two ``sampled_play``s on one batch of prompts --
the agent's and that of the player in the opponent's seat (a frozen copy, or Nash-MD's geometric
mixture of the policy and its reference, ``selfplay.mixture``) -- and interleaves their rows:
row ``2i`` is the agent's ``i``-th answer, row ``2i + 1`` the opponent's answer to the same prompt
(its tokens moved by the opponent's seat, so the agent's payoffs never score them). Every fact is
interleaved the same way. ``versus_judge(prefer)`` scores each agent answer by ``P(y > y')``,
its preference over the opponent's answer (``versus_judge(prefer, group_size=G)``: averaged over
the opponent's ``G`` answers to the same prompt): Nash-MD-PG's reward (Munos et al. 2023), where the
payoff is ``E[P(y > y')] - tau KL(pi || reference)``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from gamejax import records
from gamejax.players import judges


def _interleave(a: jax.Array, b: jax.Array) -> jax.Array:
  """Rows ``a[0], b[0], a[1], b[1], ...`` (trailing axes padded to the wider of the two)."""
  a, b = jnp.asarray(a), jnp.asarray(b)
  if a.ndim > 1 and a.shape[1] != b.shape[1]:
    t = max(a.shape[1], b.shape[1])
    pad = lambda x: jnp.pad(x, [(0, 0), (0, t - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    a, b = pad(a), pad(b)
  return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0],) + a.shape[1:])


def versus_play(agent_play: Callable, opponent_play: Callable):
  """``play(state, batch, rng)``: both plays on ``batch``, rows interleaved (see the module
  docstring); metrics are the agent's play's, and the opponent's as ``versus/...``."""

  def play(state, batch, rng):
    k_agent, k_opponent = jax.random.split(rng)
    moves_a, facts_a = agent_play(state, batch, k_agent)
    moves_o, facts_o = opponent_play(state, batch, k_opponent)
    theirs = moves_o.players == records.AGENT
    moves_o = moves_o.replace(players=jnp.where(theirs, records.OPPONENT, moves_o.players))
    moves = jax.tree.map(_interleave, moves_a, moves_o)
    facts_a, facts_o = dict(facts_a), dict(facts_o)
    metrics = dict(facts_a.pop("metrics", {}))
    metrics.update({f"versus/{k.split('/', 1)[-1]}": v
                    for k, v in facts_o.pop("metrics", {}).items()})
    facts = {k: _interleave(v, facts_o[k]) for k, v in facts_a.items()}
    facts["versus/is_opponent"] = _interleave(jnp.zeros(moves_a.tokens.shape[:1], bool),
                                              jnp.ones(moves_o.tokens.shape[:1], bool))
    return moves, {**facts, "metrics": metrics}

  return play


def agent_rows(moves: records.GameRecord, facts: Mapping[str, Any]):
  """The agent's rows (the even ones) of a versus play: ``(moves, facts)``."""
  take = lambda x: x[0::2] if hasattr(x, "shape") and x.ndim else x
  return jax.tree.map(take, moves), {k: take(v) for k, v in facts.items() if k != "metrics"}


def versus_judge(prefer: judges.Preference, seat: str = "agent",
                 group_size: int = 1) -> judges.Responder:
  """Judges each agent answer against the opponent's answers to the same prompt:
  ``"<seat>/rewards"`` = ``P(y > y')``, averaged over the opponent's ``group_size`` answers to the
  prompt (1: its one answer in the same pair of rows; ``Rollout.group_size``: all of them, the
  same unbiased estimate of ``P(y > opponent)`` with less variance), on both rows of the pair (the
  opponent's row holds no tokens of the agent's). Metrics: the mean preference
  (``judge/preference``: 1/2 when the agent plays as well as its opponent), values outside [0, 1]
  counted, and the preference's own metrics (``prefer.metrics``) of the agent's answers."""
  key = records.seat_key(seat, "rewards")
  if not isinstance(group_size, int) or group_size < 1:
    raise ValueError(f"versus_judge.group_size={group_size!r}: expected the number of answers "
                     "per prompt of each player (>= 1)")
  block = 2 * group_size                 # one prompt's rows: agent, opponent, agent, ...

  def respond(state, moves, facts, rng):
    del state, rng
    prefs = jnp.asarray(prefer(moves, facts, block), jnp.float32)      # [B / block, block, block]
    vs_PGG = prefs[:, 0::2, 1::2]        # agent answer g against the opponent's answer j
    p_B = vs_PGG.mean(-1).reshape(-1)
    metrics = {"judge/preference": p_B.mean(),
               **judges.preference_metrics(prefer, vs_PGG, *agent_rows(moves, facts))}
    return {key: jnp.repeat(p_B, 2), "metrics": metrics}

  respond.prefer, respond.group_size, respond.versus = prefer, block, True
  respond.opponent_answers = group_size
  return respond
