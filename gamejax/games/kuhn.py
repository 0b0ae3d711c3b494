"""Kuhn poker: the game tree and its exact exploitability (the language game's play comes next).

Three cards (J, Q, K = 0, 1, 2), one each to two players who ante 1; the agent (player 0) passes
or bets 1, then the opponent, and so on: ``pp`` and ``pbb``/``bb`` go to a showdown (the higher
card takes the pot), ``bp`` and ``pbp`` end with a fold. A policy is a map from OpenSpiel's
information-state strings -- the player's card then the betting history, ``"1pb"`` -- to
``[p(pass), p(bet)]``; ``exploitability`` walks the whole tree exactly (no sampling): NashConv / 2,
where a seat's best response is the best of its 64 pure strategies against the other's policy.

>>> round(exploitability(uniform_policy()), 6)
0.458333
>>> round(exploitability(nash_policy(1 / 6)), 12)
0.0
"""
from __future__ import annotations

import itertools
import json
import os
from typing import Mapping, Sequence

import numpy as np

PASS, BET = 0, 1
DEALS = tuple(itertools.permutations(range(3), 2))         # (agent's card, opponent's card)
TERMINAL = ("pp", "pbp", "pbb", "bp", "bb")
HISTORIES = {0: ("", "pb"), 1: ("p", "b")}                   # where each player acts
INFO_STATES = {p: tuple(f"{c}{h}" for c in range(3) for h in HISTORIES[p]) for p in (0, 1)}
ALL_INFO_STATES = INFO_STATES[0] + INFO_STATES[1]


class PolicyError(ValueError):
  """A policy that is not a distribution over pass/bet at every information state."""


def check_policy(policy: Mapping[str, Sequence[float]], atol: float = 1e-6) -> None:
  missing = [s for s in ALL_INFO_STATES if s not in policy]
  if missing:
    raise PolicyError(f"the policy has no probabilities for information states {missing}")
  for s in ALL_INFO_STATES:
    p = np.asarray(policy[s], np.float64)
    if p.shape != (2,) or (p < -atol).any() or abs(p.sum() - 1.0) > atol:
      raise PolicyError(f"policy[{s!r}] = {list(policy[s])}: not [p(pass), p(bet)] summing to 1")


def payoff(cards: tuple[int, int], history: str) -> float:
  """The agent's (player 0's) winnings at a terminal history."""
  if history == "bp":
    return 1.0
  if history == "pbp":
    return -1.0
  stake = 1.0 if history == "pp" else 2.0
  return stake if cards[0] > cards[1] else -stake


def _value(cards, history, policy) -> float:
  """The agent's expected winnings from ``history`` on, both players following ``policy``."""
  if history in TERMINAL:
    return payoff(cards, history)
  player = len(history) % 2
  probs = policy[f"{cards[player]}{history}"]
  return sum(probs[a] * _value(cards, history + "pb"[a], policy) for a in (PASS, BET)
             if probs[a] > 0)


def expected_value(policy: Mapping[str, Sequence[float]]) -> float:
  """The agent's expected winnings when both seats play ``policy`` (chance deals uniformly)."""
  return float(np.mean([_value(d, "", policy) for d in DEALS]))


def best_response_value(policy: Mapping[str, Sequence[float]], player: int) -> float:
  """What ``player`` wins, at best, against the other seat's part of ``policy``: the best of its
  2^6 pure strategies."""
  best = -np.inf
  for actions in itertools.product((PASS, BET), repeat=len(INFO_STATES[player])):
    profile = dict(policy)
    profile.update({s: np.eye(2)[a] for s, a in zip(INFO_STATES[player], actions)})
    v = expected_value(profile)
    best = max(best, v if player == 0 else -v)
  return best


def nash_conv(policy: Mapping[str, Sequence[float]]) -> float:
  check_policy(policy)
  v = expected_value(policy)
  return (best_response_value(policy, 0) - v) + (best_response_value(policy, 1) + v)


def exploitability(policy: Mapping[str, Sequence[float]]) -> float:
  """NashConv / 2 of ``policy`` (OpenSpiel's ``exploitability``), exact."""
  return 0.5 * nash_conv(policy)


def uniform_policy() -> dict[str, list[float]]:
  return {s: [0.5, 0.5] for s in ALL_INFO_STATES}


def nash_policy(alpha: float) -> dict[str, list[float]]:
  """Kuhn's equilibrium family (Kuhn 1950), ``alpha`` in [0, 1/3]: the agent bets a J with
  probability alpha and a K with 3 alpha, calls with a Q with alpha + 1/3; the opponent bets or
  calls a K, calls with a Q 1/3 of the time, bluffs a J 1/3 of the time after a pass."""
  if not 0.0 <= alpha <= 1.0 / 3.0:
    raise ValueError(f"nash_policy: alpha={alpha} must be in [0, 1/3]")
  bet = lambda p: [1.0 - p, p]
  return {
      "0": bet(alpha), "1": bet(0.0), "2": bet(3 * alpha),
      "0pb": bet(0.0), "1pb": bet(alpha + 1 / 3), "2pb": bet(1.0),
      "0p": bet(1 / 3), "1p": bet(0.0), "2p": bet(1.0),
      "0b": bet(0.0), "1b": bet(1 / 3), "2b": bet(1.0),
  }


def write_policy(path: str, policy: Mapping[str, Sequence[float]]) -> None:
  """Writes ``{information state: [p(pass), p(bet)]}`` as JSON (atomically), for any tool to
  check. A policy that is not a distribution at every information state cannot be written."""
  check_policy(policy)
  out = {s: [float(p) for p in policy[s]] for s in ALL_INFO_STATES}
  assert all(abs(sum(p) - 1.0) < 1e-6 for p in out.values()), "probabilities must sum to 1"
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(out, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)
