"""Kuhn poker as a multi-turn, imperfect-information language game, with its exact evaluator.

Three cards (J, Q, K = 0, 1, 2), one each to two players who ante 1; the agent (player 0) passes
or bets 1, then the opponent, and so on: ``pp`` and ``pbb``/``bb`` go to a showdown (the higher
card takes the pot), ``bp`` and ``pbp`` end with a fold.

**As a language game** each seat reads its own transcript -- its label, its private card, the
public betting -- and writes its move, ``p`` or ``b``. One game is one record row of two packed
segments, the opponent's view then the agent's (a seat never sees the other's card):

    tokens   <BOS> "2" c1  a0   o1    <BOS> "1" c0  a0    o1     a2
    players  CH    CH  CH  CH   OPP   CH    CH  CH  AGENT CH     AGENT
    segment  1     1   1   1    1     2     2   2   2     2      2

Chance (``records.CHANCE``) moves the deal, the labels, and, in a seat's view, the other seat's
bets; ``o1 a2`` appear only when the agent called a bet after passing (``pb``), else they are
padding. Illegal moves are **masked** (a seat's policy is its model's softmax over ``p`` and
``b`` only: ``legal_after``; the learner's ``apply`` is masked the same way, so payoffs score
the policy that played). The judge pays the chips won (zero-sum).

An information state's policy is the model's next-token distribution after that state's
transcript, so the step computes all 12 of them in one forward pass (``info_state_logprobs``)
and samples the batch's games from them, exactly as decoding each game's transcript would.

**Exact evaluation.** A policy is a map from OpenSpiel's information-state strings -- the player's
card then the betting history, ``"1pb"`` -- to ``[p(pass), p(bet)]``; ``exploitability`` walks
the whole tree (no sampling): NashConv / 2, where a seat's best response is the best of its 64
pure strategies against the other's policy. ``table_exploitability`` computes the same from the
policy's ``[12, 2]`` table, vectorised (NumPy or jnp: logged inside the step every step).

>>> round(exploitability(uniform_policy()), 6)
0.458333
>>> round(exploitability(nash_policy(1 / 6)), 12)
0.0
>>> round(float(table_exploitability(policy_table(uniform_policy()))), 6)
0.458333
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gamejax import records
from gamejax.data.tokenizer import BOS, PAD
from gamejax.games.base import GameConfigError, legal_moves, per_game_logprobs, seat_logprobs, token
from gamejax.players import selfplay

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


def constant_policy(move: int) -> dict[str, list[float]]:
  return {s: np.eye(2)[move].tolist() for s in ALL_INFO_STATES}


NAMED_POLICIES = {"uniform": uniform_policy, "nash": lambda: nash_policy(0.0),
                  "always_pass": lambda: constant_policy(PASS),
                  "always_bet": lambda: constant_policy(BET)}


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


def policy_table(policy: Mapping[str, Sequence[float]]) -> np.ndarray:
  """``float64[12, 2]``: ``policy``'s rows in ``ALL_INFO_STATES`` order."""
  check_policy(policy)
  return np.asarray([policy[s] for s in ALL_INFO_STATES], np.float64)


def table_policy(table) -> dict[str, list[float]]:
  """The ``{information state: [p(pass), p(bet)]}`` of a ``[12, 2]`` table (renormalised)."""
  t = np.asarray(table, np.float64)
  t = t / t.sum(-1, keepdims=True)
  return {s: t[i].tolist() for i, s in enumerate(ALL_INFO_STATES)}


def _bets(table):
  """The bet probabilities of a ``[12, 2]`` table: the agent's with its card at ``""`` and
  ``"pb"``, the opponent's at ``"p"`` and ``"b"`` (each ``[3]``, by card)."""
  bet = table[..., BET] / table.sum(-1)
  agent, opponent = bet[:6].reshape(3, 2), bet[6:].reshape(3, 2)
  return agent[:, 0], agent[:, 1], opponent[:, 0], opponent[:, 1]


_C0, _C1 = (np.asarray(c) for c in zip(*DEALS))
_WIN = np.sign(_C0 - _C1).astype(np.float64)        # the agent's showdown sign, per deal


def _deal_outcomes(first, second, after_pass, after_bet):
  """The probability of each terminal history per deal, ``{history: [..., 6]}``, given bet
  probabilities per card (``[..., 3]``): ``first``/``second`` the agent's at ``""``/``"pb"``,
  ``after_pass``/``after_bet`` the opponent's at ``"p"``/``"b"``."""
  rank = max(x.ndim for x in (first, second, after_pass, after_bet))
  lift = lambda x: x.reshape((1,) * (rank - x.ndim) + x.shape)       # explicit broadcasting
  f, s = lift(first)[..., _C0], lift(second)[..., _C0]
  op, ob = lift(after_pass)[..., _C1], lift(after_bet)[..., _C1]
  return {"pp": (1 - f) * (1 - op), "pbp": (1 - f) * op * (1 - s), "pbb": (1 - f) * op * s,
          "bp": f * (1 - ob), "bb": f * ob}


def _deal_values(first, second, after_pass, after_bet, win_rate: bool = False):
  """The agent's expected winnings per deal ``[..., 6]`` (or, with ``win_rate``, the
  probability that it wins the pot) under the given bet probabilities (``_deal_outcomes``)."""
  reach = _deal_outcomes(first, second, after_pass, after_bet)
  rank = reach["pp"].ndim
  wins = _WIN.reshape((1,) * (rank - 1) + _WIN.shape) > 0
  if win_rate:
    paid = {"pp": wins, "pbp": 0.0, "pbb": wins, "bp": 1.0, "bb": wins}
  else:
    paid = {h: np.where(wins, 1.0, -1.0) * (1.0 if h == "pp" else 2.0) for h in ("pp", "pbb", "bb")}
    paid.update({"pbp": -1.0, "bp": 1.0})
  return sum(reach[h] * paid[h] for h in TERMINAL)


_PURE = np.asarray(list(itertools.product((0.0, 1.0), repeat=2)))      # [4, 2] per-card plans
_AT_CARD = np.eye(3)[:, None, :] > 0                                    # [3 cards, 1, 3]


def table_gains(table):
  """``(agent's, opponent's)`` best-response gains of a ``[12, 2]`` policy table (rows in
  ``ALL_INFO_STATES`` order): what each seat would win by best-responding to the other's
  policy, exact and vectorised; NumPy or jnp (it only measures). A seat's best response picks,
  for each of its cards, the best of its 4 pure plans at that card's two information states
  (the 64 pure strategies, card by card)."""
  xp = jnp if isinstance(table, jax.Array) else np
  first, second, after_pass, after_bet = _bets(table)
  value = _deal_values(first, second, after_pass, after_bet).mean()
  plan = lambda k, bets: xp.where(_AT_CARD, _PURE[None, :, k, None], bets)   # [3, 4, 3]
  agent = _deal_values(plan(0, first), plan(1, second), after_pass, after_bet)      # [3, 4, 6]
  opponent = -_deal_values(first, second, plan(0, after_pass), plan(1, after_bet))
  mine = lambda cards: np.arange(3)[:, None, None] == cards[None, None]              # [3, 1, 6]
  best = lambda v, cards: xp.where(mine(cards), v, 0.0).sum(-1).max(-1).sum() / 6
  return best(agent, _C0) - value, best(opponent, _C1) + value


def table_exploitability(table):
  """NashConv / 2 of a ``[12, 2]`` policy table: half the seats' ``table_gains``."""
  agent, opponent = table_gains(table)
  return 0.5 * (agent + opponent)


# ---- the language game ---------------------------------------------------------------------------

CARDS = "JQK"                      # card 0, 1, 2 is the token of CARDS[i]
MOVES = "pb"                       # pass (check/fold), bet (bet/call)
LABELS = {"agent": "1", "opponent": "2"}
SEAT_OF = {0: "agent", 1: "opponent"}
PREFIX_LEN = 5                     # the longest information state's transcript: <BOS> 1 c p b
# Where each seat's information states sit in ALL_INFO_STATES (the policy table's rows).
ROWS = {SEAT_OF[p]: np.asarray([ALL_INFO_STATES.index(s) for s in INFO_STATES[p]])
        for p in (0, 1)}


def _row(card, history_code):
  """The table row of (card, history) for the agent (``""`` = 0, ``"pb"`` = 1) or the
  opponent's (``"p"`` = 0, ``"b"`` = 1) information states, relative to the seat's rows."""
  return 2 * card + history_code


def transcript(info_state: str) -> np.ndarray:
  """The token ids a seat reads at ``info_state`` (``"1pb"``): ``<BOS>``, its label, its card,
  the betting so far."""
  seat = SEAT_OF[(len(info_state) - 1) % 2]
  text = LABELS[seat] + CARDS[int(info_state[0])] + info_state[1:]
  return np.asarray([BOS] + [token(c) for c in text], np.int32)


def profile_table(tables: Mapping[str, Any]):
  """The ``[12, 2]`` profile of the players in the two seats (seat -> that player's ``[12, 2]``
  table): each seat's information states from its own player's table. NumPy or jnp."""
  agent, opponent = tables["agent"], tables["opponent"]
  at_agent = np.isin(np.arange(len(ALL_INFO_STATES)), ROWS["agent"])[:, None]
  xp = jnp if isinstance(agent, jax.Array) or isinstance(opponent, jax.Array) else np
  return xp.where(at_agent, agent, opponent)


def sampled_chips(deal, a0, o1, a2):
  """The agent's chips in each sampled game (``deal`` indexes ``DEALS``; ``a0``, ``o1``, ``a2``
  the moves, ``a2`` read only after ``pb``): ``_deal_values`` of the moves played, as bet
  probabilities of 0 or 1, at the game's deal."""
  bet = lambda move: jnp.broadcast_to((move == BET).astype(jnp.float32)[:, None],
                                      (move.shape[0], 3))
  values = _deal_values(bet(a0), bet(a2), bet(o1), bet(o1))          # [n, 6 deals]
  return jnp.take_along_axis(values, deal[:, None], axis=1)[:, 0]


def league_table(tables_K, weights_K):
  """The behaviour policy ``[12, 2]`` of a league that draws member ``k`` (table ``[12, 2]``)
  with probability ``weights_K[k]`` for the whole game: at each information state the members'
  policies weighted by how likely each is to reach it (Kuhn's theorem; the agent's second
  decision is reached by the members that passed first)."""
  xp = jnp if isinstance(tables_K, jax.Array) else np
  reach = xp.ones(tables_K.shape[:2], tables_K.dtype)                # [K, 12]
  for card in range(3):                                              # the agent at "<card>pb"
    first, second = ROWS["agent"][_row(card, 0)], ROWS["agent"][_row(card, 1)]
    if xp is np:
      reach[:, second] = tables_K[:, first, PASS]
    else:
      reach = reach.at[:, second].set(tables_K[:, first, PASS])
  w = weights_K[:, None] * reach
  return (w[..., None] * tables_K).sum(0) / xp.maximum(w.sum(0), 1e-30)[:, None]


@dataclasses.dataclass(frozen=True, eq=False)
class KuhnGame:
  """Kuhn poker played by language models (see the module docstring)."""
  reward_scale: float = 1.0        # rewards are the chips won / reward_scale
  name: str = "kuhn"

  def move_tokens(self) -> np.ndarray:
    return np.asarray([token(c) for c in MOVES], np.int32)

  def legal_after(self, vocab_size: int) -> np.ndarray:
    """``bool[V, V]``: after a seat label a card; after a card or a move, a move; elsewhere
    anything."""
    legal = np.ones((vocab_size, vocab_size), bool)
    cards = [token(c) for c in CARDS]
    for label in LABELS.values():
      legal[token(label)] = False
      legal[token(label), cards] = True
    for t in cards + [token(c) for c in MOVES]:
      legal[t] = False
      legal[t, self.move_tokens()] = True
    return legal

  def mask(self, apply: Callable, vocab_size: int) -> Callable:
    return legal_moves(apply, self.legal_after(vocab_size))

  # ---- policies -----------------------------------------------------------------------------

  def info_state_logprobs(self, apply: Callable, params: Any) -> jax.Array:
    """``float32[12, 2]``: log-probs of pass and bet at every information state (rows in
    ``ALL_INFO_STATES`` order), one forward pass over the 12 transcripts."""
    prefixes = [transcript(s) for s in ALL_INFO_STATES]
    lengths = np.asarray([len(p) for p in prefixes])
    tokens = np.full((len(prefixes), PREFIX_LEN), PAD, np.int32)
    segments = np.zeros_like(tokens)
    for i, p in enumerate(prefixes):
      tokens[i, :len(p)], segments[i, :len(p)] = p, 1
    positions = np.broadcast_to(np.arange(PREFIX_LEN, dtype=np.int32), tokens.shape)
    out = apply(params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments))
    logits = out[0] if isinstance(out, tuple) else out
    last = logits[np.arange(len(prefixes)), lengths - 1].astype(jnp.float32)
    return jax.nn.log_softmax(last, axis=-1)[:, self.move_tokens()]

  def policy_logprobs(self, apply: Callable, value: Any) -> jax.Array:
    """``float32[12, 2]``: the policy of the player ``value`` (params, or a mixture)."""
    return seat_logprobs(lambda p: self.info_state_logprobs(apply, p), value)

  def seat_table(self, apply: Callable, value: Any) -> np.ndarray:
    """``float64[12, 2]``: the behaviour policy of ``value`` (params, a mixture or a league)."""
    logprobs = functools.partial(_jit_policy_logprobs, self)
    if selfplay.is_league(value):
      members = int(selfplay.league_members(value))
      tables = np.stack([np.exp(np.asarray(logprobs(apply, selfplay.league_member(value, k)),
                                           np.float64)) for k in range(members)])
      return league_table(tables, np.full(members, 1.0 / members))
    return np.exp(np.asarray(logprobs(apply, value), np.float64))

  def profile(self, apply: Callable, seats: Mapping[str, Any]) -> dict[str, list[float]]:
    """The strategy profile of the players in ``seats`` (seat -> params): each seat's
    information states from the player sitting in it, as ``{OpenSpiel info state: [p(pass),
    p(bet)]}`` (what ``gamejax eval --export_policy`` writes)."""
    return table_policy(profile_table({seat: self.seat_table(apply, seats[seat])
                                       for seat in records.SEATS}))

  def evaluate(self, apply: Callable, seats: Mapping[str, Any]) -> dict:
    """Exact figures of the seated players' policies, by walking the tree in float64:
    ``exploitability`` (NashConv / 2), ``nash_conv``, and per seat its policy, its expected
    winnings and what a best response to the other seat would gain it."""
    policy = self.profile(apply, seats)
    value = expected_value(policy)
    values = {"agent": value, "opponent": -value}
    gain = {"agent": best_response_value(policy, 0) - value,
            "opponent": best_response_value(policy, 1) + value}
    conv = gain["agent"] + gain["opponent"]
    return {"exploitability": 0.5 * conv, "nash_conv": conv,
            "seats": {seat: {"policy": {s: policy[s] for s in INFO_STATES[p]},
                             "value": values[seat], "best_response_gain": gain[seat]}
                      for p, seat in SEAT_OF.items()}}

  def win_rates(self, apply: Callable, players: Sequence[Any]) -> np.ndarray:
    """``float64[N, N]``: the probability that player ``i`` in the agent's seat wins the pot
    against player ``j`` in the opponent's, exactly (chance deals uniformly)."""
    tables = [self.seat_table(apply, p) for p in players]
    bets = [_bets(t) for t in tables]
    return np.array([[float(_deal_values(bets[i][0], bets[i][1], bets[j][2], bets[j][3],
                                         win_rate=True).mean()) for j in range(len(players))]
                     for i in range(len(players))])

  def scripted_policy(self, policy: Any, seat: str) -> np.ndarray:
    """``float64[12, 2]``: a scripted player's policy (the seat plays its rows): ``"uniform"``,
    ``"always_pass"``, ``"always_bet"``, ``"nash"`` / ``"nash:ALPHA"`` (Kuhn's equilibrium
    family, alpha in [0, 1/3], default 0), ``{information state: [p(pass), p(bet)]}`` or the
    path of such a JSON file (``gamejax eval --export_policy`` writes one)."""
    setting = f"seats[{seat!r}]=scripted({policy!r})"
    try:
      if isinstance(policy, str) and policy in NAMED_POLICIES:
        return policy_table(NAMED_POLICIES[policy]())
      if isinstance(policy, str) and policy.startswith("nash:"):
        return policy_table(nash_policy(float(policy[len("nash:"):])))
      if isinstance(policy, str) and policy.endswith(".json"):
        with open(policy, encoding="utf-8") as f:
          return policy_table(json.load(f))
      if isinstance(policy, Mapping):
        return policy_table(policy)
    except (OSError, ValueError) as e:            # PolicyError, a bad alpha, a bad JSON file
      raise GameConfigError(f"{setting}: {e}") from e
    raise GameConfigError(f"{setting}: expected one of {sorted(NAMED_POLICIES)}, 'nash:ALPHA', "
                          "a {information state: [p(pass), p(bet)]} dict or a .json file of one")

  def export_policy(self, apply: Callable, seats: Mapping[str, Any], path: str) -> None:
    write_policy(path, self.profile(apply, seats))

  # ---- in the step ------------------------------------------------------------------------------

  def play_fn(self, apply: Callable, seats: Mapping[str, str], player_params: Callable,
              model=None):
    """``play(state, batch, rng) -> (moves, facts)``: ``batch["games"]`` rows of games, chance
    dealing uniformly, each seat's moves sampled from the player sitting in it."""
    moves_tok = jnp.asarray(self.move_tokens())
    cards_tok = jnp.asarray([token(c) for c in CARDS])
    deals = jnp.asarray(DEALS, jnp.int32)
    rows = {s: jnp.asarray(r) for s, r in ROWS.items()}

    def seat_policy(state, seat, n, key):
      """``(logp_B62, table_12x2)``: each game's log-probs at the seat's 6 information states
      (its card, history code) and the seat's behaviour policy table."""
      value = jax.lax.stop_gradient(player_params(state, seats[seat]))
      logp_B, logp_K, weights_K = per_game_logprobs(
          lambda p: self.policy_logprobs(apply, p), value, n, key)
      return logp_B[:, rows[seat]], league_table(jnp.exp(logp_K), weights_K)

    def play(state, batch, rng):
      n = jnp.asarray(batch["games"]).shape[0]
      k_deal, k_agent, k_opp, k_second, k_league = jax.random.split(rng, 5)
      picks = jax.random.split(k_league)
      (logp_a, table_a), (logp_o, table_o) = (seat_policy(state, s, n, k)
                                               for s, k in zip(records.SEATS, picks))
      deal = jax.random.randint(k_deal, (n,), 0, len(DEALS))
      c0, c1 = deals[deal].T
      at = lambda logp, row: jnp.take_along_axis(logp, row[:, None, None], axis=1)[:, 0]
      first_logp = at(logp_a, _row(c0, 0))
      a0 = jax.random.categorical(k_agent, first_logp)
      reply_logp = at(logp_o, _row(c1, a0))
      o1 = jax.random.categorical(k_opp, reply_logp)
      second_logp = at(logp_a, _row(c0, 1))
      a2 = jax.random.categorical(k_second, second_logp)
      third = (a0 == PASS) & (o1 == BET)                  # the agent faces a bet after passing
      chosen = lambda logp, a: jnp.take_along_axis(logp, a[:, None], axis=1)[:, 0]
      ones = jnp.ones((n,), jnp.int32)
      lab = {s: token(LABELS[s]) for s in records.SEATS}
      opp_view = [ones * BOS, ones * lab["opponent"], cards_tok[c1], moves_tok[a0], moves_tok[o1]]
      agent_view = [ones * BOS, ones * lab["agent"], cards_tok[c0], moves_tok[a0],
                    jnp.where(third, moves_tok[o1], PAD), jnp.where(third, moves_tok[a2], PAD)]
      tokens = jnp.stack(opp_view + agent_view, axis=1)
      C, A, O, N = records.CHANCE, records.AGENT, records.OPPONENT, records.NOBODY
      players = jnp.stack(
          [ones * C] * 4 + [ones * O] + [ones * C] * 3 + [ones * A]
          + [jnp.where(third, C, N), jnp.where(third, A, N)], axis=1)
      segments = jnp.stack([ones] * 5 + [ones * 2] * 4 + [jnp.where(third, 2, 0)] * 2, axis=1)
      positions = jnp.stack([ones * i for i in range(5)] + [ones * i for i in range(4)]
                            + [jnp.where(third, 4, 0), jnp.where(third, 5, 0)], axis=1)
      zero = jnp.zeros((n,), jnp.float32)
      behaviour = jnp.stack(
          [zero, zero, zero, chosen(reply_logp, o1), zero,
           zero, zero, chosen(first_logp, a0), zero, jnp.where(third, chosen(second_logp, a2), 0.0),
           zero], axis=1)
      chips = sampled_chips(deal, a0, o1, a2)
      record = records.GameRecord(tokens=tokens, positions=positions, segment_ids=segments,
                                  players=players)
      a_gain, o_gain = table_gains(profile_table({"agent": table_a, "opponent": table_o}))
      metrics = {"exploitability": 0.5 * (a_gain + o_gain),
                 "best_response_gain/agent": a_gain, "best_response_gain/opponent": o_gain,
                 "play/tokens": (segments > 0).sum().astype(jnp.float32),
                 "play/bet_rate": ((a0 == BET).sum() + (o1 == BET).sum()
                                   + (third & (a2 == BET)).sum()) / (2 * n + third.sum())}
      facts = {"behaviour_logprobs": behaviour, "chips": chips, "metrics": metrics}
      return record, facts

    return play

  def respond_fn(self, vocab_size: int, apply_of=None):
    """The judge: the chips each seat won (zero-sum), over ``reward_scale``."""
    del vocab_size

    def respond(state, moves, facts, rng):
      del state, moves, rng
      chips = facts["chips"]
      return {"agent/rewards": chips / self.reward_scale,
              "opponent/rewards": -chips / self.reward_scale,
              "metrics": {"judge/agent_reward": chips.mean(),
                          "judge/opponent_reward": -chips.mean()}}

    return respond


@functools.partial(jax.jit, static_argnums=(0, 1))
def _jit_policy_logprobs(game: KuhnGame, apply: Callable, value: Any) -> jax.Array:
  """``game.policy_logprobs`` compiled once per game and ``apply``."""
  return game.policy_logprobs(apply, value)


def kuhn_poker(reward_scale: float = 1.0) -> KuhnGame:
  """Kuhn poker from gin; rewards are the chips won divided by ``reward_scale``."""
  if not (isinstance(reward_scale, (int, float)) and not isinstance(reward_scale, bool)
          and np.isfinite(reward_scale) and reward_scale > 0):
    raise GameConfigError(f"kuhn_poker.reward_scale={reward_scale!r}; expected a number > 0")
  return KuhnGame(reward_scale=float(reward_scale))
