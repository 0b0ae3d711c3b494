"""Matrix games as language games: each seat writes one token, its move, seeing only its seat.

A two-player normal-form game with payoff matrices ``A`` (the agent's, rows) and ``B`` (the
opponent's, columns; ``B = -A`` when zero-sum) is played by a language model: the agent reads
``<BOS> 1`` and writes its action's token, the opponent reads ``<BOS> 2`` and writes its own. The
moves are simultaneous: each seat's transcript is its own segment of one packed record row,

    tokens   <BOS> "1" a   <BOS> "2" b
    players  CHANCE CHANCE AGENT  CHANCE CHANCE OPPONENT
    segment  1     1   1   2     2   2

so a seat never sees the other's move. Illegal tokens are masked: a seat's policy is its model's
softmax over its own action tokens only (``legal_after``; the learner's ``apply`` is masked the
same way, so payoffs score the policy that played). The judge pays ``A[a, b]`` and ``B[a, b]``
(divided by ``reward_scale``), and the exact exploitability of both seats' policies -- one forward
pass each, no sampling -- is logged every step as ``exploitability`` (NashConv / 2, in the
matrix's own units).

Presets: ``rps`` (rock-paper-scissors, Nash uniform) and ``biased_rps``
``[[0, -25, 50], [25, 0, -5], [-50, 5, 0]]`` (Nash ``(1/16, 10/16, 5/16)`` for both seats).

>>> game = matrix_game(preset="biased_rps")
>>> x = np.array([1, 10, 5]) / 16
>>> round(float(nash_conv(game.agent_matrix, game.opponent_matrix, x, x)), 12)
0.0
>>> float(nash_conv(game.agent_matrix, game.opponent_matrix, np.ones(3) / 3, np.ones(3) / 3))
16.666666666666668
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize

from gamejax import records
from gamejax.data.tokenizer import BOS
from gamejax.games.base import (GameConfigError, check_distribution, legal_moves, per_game_logprobs,
                                seat_logprobs, token)
from gamejax.players import selfplay

PRESETS = {
    "rps": ("RPS", ((0, -1, 1), (1, 0, -1), (-1, 1, 0))),
    "biased_rps": ("RPS", ((0, -25, 50), (25, 0, -5), (-50, 5, 0))),
}
LABELS = {"agent": "1", "opponent": "2"}
FEEDBACK = ("sampled", "expected")


def nash_conv(a, b, x, y):
  """``NashConv = [max_i (A y)_i - x A y] + [max_j (x B)_j - x B y]``: how much the two seats
  gain by best-responding to each other's mixed strategies ``x`` (rows) and ``y`` (columns).
  Exploitability is half of it. NumPy or jnp arrays."""
  agent, opponent = seat_gains(a, b, x, y)
  return agent + opponent


def seat_gains(a, b, x, y):
  """``(agent's, opponent's)`` best-response gains: what each seat would win by best-responding
  to the other's mixed strategy (their sum is ``nash_conv``)."""
  xp = jnp if any(isinstance(v, jax.Array) for v in (a, b, x, y)) else np
  ay, xb = a @ y, x @ b
  return xp.max(ay) - x @ ay, xp.max(xb) - xb @ y


def maxmin_strategy(m: np.ndarray) -> np.ndarray:
  """The mixed strategy over ``m``'s rows that maximises the worst case ``min_j (x m)_j`` (a
  linear program): in a zero-sum game, a Nash equilibrium strategy of the row player."""
  n, k = m.shape
  res = optimize.linprog(np.r_[np.zeros(n), -1.0], A_ub=np.c_[-m.T, np.ones(k)],
                         b_ub=np.zeros(k), A_eq=np.r_[np.ones(n), 0.0][None], b_eq=[1.0],
                         bounds=[(0, None)] * n + [(None, None)], method="highs")
  if not res.success:
    raise GameConfigError(f"no maxmin strategy for {m.tolist()}: {res.message}")
  x = np.maximum(res.x[:n], 0.0)
  return x / x.sum()


def _matrix(value, setting: str) -> np.ndarray:
  """A rectangular, finite, numeric 2-D matrix, or a GameConfigError naming ``setting``."""
  if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not len(value):
    raise GameConfigError(f"{setting}: expected a non-empty list of rows of numbers; got "
                          f"{value!r}")
  rows = []
  for i, row in enumerate(value):
    if isinstance(row, (str, bytes)) or not isinstance(row, Sequence) or not len(row):
      raise GameConfigError(f"{setting}: row {i} is {row!r}, not a non-empty list of numbers")
    bad = [v for v in row if isinstance(v, bool) or not isinstance(v, numbers.Real)]
    if bad:
      raise GameConfigError(f"{setting}: row {i} holds {bad[0]!r}, not a number")
    rows.append([float(v) for v in row])
  widths = {len(r) for r in rows}
  if len(widths) > 1:
    raise GameConfigError(f"{setting}: not rectangular, rows have {[len(r) for r in rows]} "
                          "entries")
  out = np.asarray(rows, np.float64)
  if not np.isfinite(out).all():
    raise GameConfigError(f"{setting}: entries must be finite; got {value!r}")
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class MatrixGame:
  """A two-player matrix game played by language models (see the module docstring)."""
  agent_matrix: np.ndarray         # float64[K, L], the agent's payoff of (row a, column b)
  opponent_matrix: np.ndarray      # float64[K, L], the opponent's
  actions: str                     # action i of either seat is the token of actions[i]
  reward_scale: float              # rewards are the payoffs / reward_scale
  name: str = "matrix"
  feedback: str = "sampled"        # action values against the sampled move, or "expected"

  def action_tokens(self, seat: str) -> np.ndarray:
    n = self.agent_matrix.shape[0 if seat == "agent" else 1]
    return np.asarray([token(c) for c in self.actions[:n]], np.int32)

  def prefix(self, seat: str) -> np.ndarray:
    """The seat's information state: ``<BOS>`` and its label."""
    return np.asarray([BOS, token(LABELS[seat])], np.int32)

  def legal_after(self, vocab_size: int) -> np.ndarray:
    """``bool[V, V]``: which tokens may follow each token (after a seat's label: its actions;
    elsewhere anything)."""
    legal = np.ones((vocab_size, vocab_size), bool)
    for seat, label in LABELS.items():
      legal[token(label)] = False
      legal[token(label), self.action_tokens(seat)] = True
    return legal

  def mask(self, apply: Callable, vocab_size: int) -> Callable:
    """``apply`` whose logits give illegal next tokens ``MASKED`` (a policy over legal moves)."""
    return legal_moves(apply, self.legal_after(vocab_size))

  def seat_matrix(self, seat: str) -> np.ndarray:
    """The seat's own payoffs, rows its actions and columns the other seat's."""
    return self.agent_matrix if seat == "agent" else self.opponent_matrix.T

  def scripted_policy(self, policy: Any, seat: str) -> np.ndarray:
    """``float64[A]``: a scripted player's mixed strategy in ``seat``: ``"uniform"``,
    ``"nash"`` (the seat's maxmin strategy, a Nash equilibrium strategy of a zero-sum game), one
    action's character (``"R"``: always that action) or the probabilities of its actions."""
    n = len(self.action_tokens(seat))
    setting = f"seats[{seat!r}]=scripted({policy!r})"
    if isinstance(policy, str) and policy == "uniform":
      return np.full(n, 1.0 / n)
    if isinstance(policy, str) and policy == "nash":
      if not np.array_equal(self.opponent_matrix, -self.agent_matrix):
        raise GameConfigError(f"{setting}: 'nash' needs a zero-sum game (give the "
                              "probabilities)")
      return maxmin_strategy(self.seat_matrix(seat))
    if isinstance(policy, str) and len(policy) == 1 and policy in self.actions[:n]:
      return np.eye(n)[self.actions.index(policy)]
    if isinstance(policy, str):
      raise GameConfigError(f"{setting}: expected 'uniform', 'nash', one of the seat's actions "
                            f"{list(self.actions[:n])} or a list of {n} probabilities")
    return check_distribution(policy, n, setting)

  # ---- in the step ------------------------------------------------------------------------------

  def seat_logprobs(self, apply: Callable, params: Any, seat: str) -> jax.Array:
    """``float32[A]``: the seat's policy, log-probs of its actions (one forward pass)."""
    prefix = jnp.asarray(self.prefix(seat))[None]
    logits_V = apply(params, prefix, jnp.arange(2)[None], jnp.ones_like(prefix))[0, -1]
    logp_V = jax.nn.log_softmax(logits_V.astype(jnp.float32))
    return logp_V[jnp.asarray(self.action_tokens(seat))]

  def policy_logprobs(self, apply: Callable, value: Any, seat: str) -> jax.Array:
    """``float32[A]``: the seat's policy when ``value`` sits in it (params, or a mixture)."""
    return seat_logprobs(lambda p: self.seat_logprobs(apply, p, seat), value)

  def evaluate(self, apply: Callable, seats: Mapping[str, Any]) -> dict:
    """Exact figures of the policies of the players in ``seats`` (seat -> params), in float64:
    ``exploitability`` (NashConv / 2), ``nash_conv``, and per seat its policy, its expected
    payoff and what a best response to the other seat would gain it."""
    probs = {}
    policy = jax.jit(self.policy_logprobs, static_argnums=(0, 2))
    for seat in records.SEATS:
      value = seats[seat]
      if selfplay.is_league(value):         # the league's mixed strategy: its members' average
        members = int(selfplay.league_members(value))
        p = np.mean([np.exp(np.asarray(policy(apply, selfplay.league_member(value, k), seat),
                                       np.float64)) for k in range(members)], axis=0)
      else:
        p = np.exp(np.asarray(policy(apply, value, seat), np.float64))
      probs[seat] = p / p.sum()
    x, y = probs["agent"], probs["opponent"]
    a, b = self.agent_matrix, self.opponent_matrix
    value = {"agent": float(x @ a @ y), "opponent": float(x @ b @ y)}
    gain = dict(zip(records.SEATS, map(float, seat_gains(a, b, x, y))))
    conv = gain["agent"] + gain["opponent"]
    return {"exploitability": 0.5 * conv, "nash_conv": conv,
            "seats": {seat: {"policy": dict(zip(self.actions, probs[seat].tolist())),
                             "value": value[seat], "best_response_gain": gain[seat]}
                      for seat in records.SEATS}}

  def win_rates(self, apply: Callable, players: Sequence[Any]) -> np.ndarray:
    """``float64[N, N]``: the probability that player ``i`` in the agent's seat beats player
    ``j`` in the opponent's (gets the larger payoff; a tie counts half), exactly."""
    policy = jax.jit(self.seat_logprobs, static_argnums=(0, 2))
    probs = {seat: [np.exp(np.asarray(policy(apply, p, seat), np.float64)) for p in players]
             for seat in records.SEATS}
    a, b = self.agent_matrix, self.opponent_matrix
    outcome = (a > b) + 0.5 * (a == b)
    n = len(players)
    return np.array([[probs["agent"][i] @ outcome @ probs["opponent"][j] for j in range(n)]
                     for i in range(n)])

  def play_fn(self, apply: Callable, seats: Mapping[str, str], player_params: Callable,
              model=None):
    """``play(state, batch, rng) -> (moves, facts)``: ``batch["games"]`` rows of games, each
    seat's move sampled from the params of the player sitting in it (``seats[seat]``)."""
    tokens = {s: jnp.asarray(self.action_tokens(s)) for s in records.SEATS}

    def seat_policy(state, seat, n, key):
      """``(logp_BA, probs_A)``: each game's policy for ``seat`` and the seat's mixed strategy
      (a league's: the average of its members', one member drawn per game)."""
      value = jax.lax.stop_gradient(player_params(state, seats[seat]))
      logp_BA, logp_KA, weights_K = per_game_logprobs(
          lambda p: self.seat_logprobs(apply, p, seat), value, n, key)
      return logp_BA, weights_K @ jnp.exp(logp_KA)

    def play(state, batch, rng):
      n = jnp.asarray(batch["games"]).shape[0]
      picks = jax.random.split(jax.random.fold_in(rng, 1))        # a league's member per game
      policies = {s: seat_policy(state, s, n, k) for s, k in zip(records.SEATS, picks)}
      logp = {s: policies[s][0] for s in records.SEATS}
      keys = dict(zip(records.SEATS, jax.random.split(rng)))
      moves = {s: jax.random.categorical(keys[s], logp[s]) for s in records.SEATS}
      ones = jnp.ones((n, 1), jnp.int32)
      label = {s: token(LABELS[s]) for s in records.SEATS}
      tokens_BT = jnp.concatenate([
          ones * BOS, ones * label["agent"], tokens["agent"][moves["agent"]][:, None],
          ones * BOS, ones * label["opponent"], tokens["opponent"][moves["opponent"]][:, None]],
          axis=1)
      row = lambda v: jnp.broadcast_to(jnp.asarray(v, jnp.int32), (n, 6))
      record = records.GameRecord(
          tokens=tokens_BT, positions=row([0, 1, 2, 0, 1, 2]), segment_ids=row([1, 1, 1, 2, 2, 2]),
          players=row([records.CHANCE, records.CHANCE, records.AGENT,
                       records.CHANCE, records.CHANCE, records.OPPONENT]))
      zero = jnp.zeros((n, 1), jnp.float32)
      chosen = {s: jnp.take_along_axis(logp[s], moves[s][:, None], axis=1)
                for s in records.SEATS}
      behaviour_BT = jnp.concatenate([zero, chosen["agent"], zero,
                                      zero, chosen["opponent"], zero], axis=1)
      x, y = policies["agent"][1], policies["opponent"][1]
      a_gain, o_gain = seat_gains(jnp.asarray(self.agent_matrix, jnp.float32),
                                  jnp.asarray(self.opponent_matrix, jnp.float32), x, y)
      metrics = {"exploitability": 0.5 * (a_gain + o_gain),
                 "best_response_gain/agent": a_gain, "best_response_gain/opponent": o_gain,
                 "play/tokens": jnp.asarray(6.0 * n, jnp.float32)}
      for s, probs in (("agent", x), ("opponent", y)):
        metrics.update({f"policy/{s}/{c}": p for c, p in zip(self.actions, probs)})
      facts = {"behaviour_logprobs": behaviour_BT, "agent/action": moves["agent"],
               "opponent/action": moves["opponent"], "metrics": metrics,
               "agent/policy": jnp.broadcast_to(x, (n, x.shape[0])),
               "opponent/policy": jnp.broadcast_to(y, (n, y.shape[0]))}
      return record, facts

    return play

  def respond_fn(self, vocab_size: int, apply_of=None):
    """The judge: each seat's payoff of the two moves (over ``reward_scale``), and each seat's
    ``action_values`` (``float32[B, V]``): what each of its action tokens would have paid against
    the other's move (0 for other tokens, which the seat cannot play)."""
    a_mat = jnp.asarray(self.agent_matrix / self.reward_scale, jnp.float32)
    b_mat = jnp.asarray(self.opponent_matrix / self.reward_scale, jnp.float32)
    dense = {s: (lambda v_BA, ids=jnp.asarray(self.action_tokens(s)):
                 jnp.zeros((v_BA.shape[0], vocab_size), jnp.float32).at[:, ids].set(v_BA))
             for s in records.SEATS}

    def respond(state, moves, facts, rng):
      del state, moves, rng
      a, b = facts["agent/action"], facts["opponent/action"]
      rewards = {"agent": a_mat[a, b], "opponent": b_mat[a, b]}
      out = {records.seat_key(s, "rewards"): r for s, r in rewards.items()}
      if self.feedback == "expected":     # against the other seat's mixed strategy
        out["agent/action_values"] = dense["agent"](facts["opponent/policy"] @ a_mat.T)
        out["opponent/action_values"] = dense["opponent"](facts["agent/policy"] @ b_mat)
      else:                               # against the other seat's sampled move
        out["agent/action_values"] = dense["agent"](a_mat[:, b].T)
        out["opponent/action_values"] = dense["opponent"](b_mat[a, :])
      out["metrics"] = {f"judge/{s}_reward": r.mean() * self.reward_scale
                        for s, r in rewards.items()}
      return out

    return respond


def matrix_game(matrix: Sequence[Sequence[float]] | None = None, preset: str | None = None,
                opponent_matrix: Sequence[Sequence[float]] | None = None,
                actions: str | None = None, normalize: bool = True,
                feedback: str = "sampled") -> MatrixGame:
  """A matrix game from gin: ``preset`` (``rps``, ``biased_rps``) or the agent's ``matrix``
  (rows: the agent's actions, columns: the opponent's; a ``matrix`` replaces the preset, so
  ``--gin.matrix_game.matrix=[[...]]`` overrides an experiment's preset); ``opponent_matrix`` for a general-sum
  game (default ``-matrix``: zero-sum). ``actions``: one character per action (default ``RPS``
  for the presets, ``abc...`` otherwise). ``normalize``: rewards divided by the largest
  ``|payoff|`` (exploitability stays in the matrix's units). ``feedback``: the judge's
  ``action_values`` of a seat are its payoffs against the other seat's ``"sampled"`` move, or
  ``"expected"`` against its mixed strategy (full-information feedback, as in the tabular
  learning-in-games literature; the rewards are always of the sampled moves)."""
  if feedback not in FEEDBACK:
    raise GameConfigError(f"matrix_game.feedback={feedback!r}; expected one of {FEEDBACK}")
  if matrix is None and preset is None:
    raise GameConfigError("matrix_game: give matrix=[[...], ...] or preset= (one of "
                          f"{sorted(PRESETS)})")
  name = "matrix"
  if matrix is None:
    if preset not in PRESETS:
      raise GameConfigError(f"matrix_game.preset={preset!r}; expected one of {sorted(PRESETS)}")
    default_actions, matrix = PRESETS[preset]
    name = preset
  else:
    default_actions = "abcdefghijklmnopqrstuvwxyz"
  a = _matrix(matrix, "matrix_game.matrix")
  b = -a if opponent_matrix is None else _matrix(opponent_matrix, "matrix_game.opponent_matrix")
  if b.shape != a.shape:
    raise GameConfigError(f"matrix_game.opponent_matrix has shape {b.shape}; the matrix has "
                          f"{a.shape}")
  actions = default_actions if actions is None else actions
  n = max(a.shape)
  if len(actions) < n or len(set(actions[:n])) < n or set(actions) & set(LABELS.values()) or (
      not actions.isascii()):
    raise GameConfigError(f"matrix_game.actions={actions!r}: needs {n} distinct ASCII characters "
                          f"other than the seat labels {sorted(LABELS.values())}")
  scale = float(max(np.abs(a).max(), np.abs(b).max())) if normalize else 1.0
  return MatrixGame(agent_matrix=a, opponent_matrix=b, actions=actions[:n],
                    reward_scale=scale or 1.0, name=name, feedback=feedback)
