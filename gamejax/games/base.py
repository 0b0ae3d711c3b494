"""What every game shares: its turn structure (who moves when, for how many tokens), its tokens,
its legal moves and the players a seat can hold.

A transcript follows its game's turns when its runs of consecutive same-player tokens are the
turns in order (a turn may be cut short, never overrun). BOS belongs to the opening move, EOS to
the move it closes.

>>> turns = Turns((Turn("opponent", 4), Turn("agent", 3)))
>>> turns.max_len, turns.max_move("agent")
(7, 3)
>>> turns.check([1, 5, 6, 7, 8, 2], [2, 2, 2, 1, 1, 1])
"""
from __future__ import annotations

import dataclasses
import itertools
import numbers
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gamejax.data.tokenizer import OFFSET
from gamejax.models import logprobs
from gamejax.players import selfplay
from gamejax.records import PLAYER_NAMES


@dataclasses.dataclass(frozen=True)
class Turn:
  player: str        # "agent" or "opponent"
  max_len: int       # the most tokens this move may take

  def __post_init__(self):
    if self.player not in PLAYER_NAMES:
      raise ValueError(f"Turn.player={self.player!r}; expected one of {sorted(PLAYER_NAMES)}")
    if self.max_len < 1:
      raise ValueError(f"Turn.max_len={self.max_len} must be >= 1")


@dataclasses.dataclass(frozen=True)
class Turns:
  turns: tuple[Turn, ...]

  @property
  def max_len(self) -> int:
    return sum(t.max_len for t in self.turns)

  def max_move(self, player: str) -> int:
    """The longest single move ``player`` may make."""
    return max((t.max_len for t in self.turns if t.player == player), default=0)

  def check(self, tokens: Sequence[int], players: Sequence[int]) -> None:
    """Raises ValueError when a transcript does not follow these turns."""
    if len(tokens) != len(players):
      raise ValueError(f"transcript has {len(tokens)} tokens but {len(players)} player ids")
    runs = [(int(p), len(list(g))) for p, g in itertools.groupby(players)]
    if len(runs) > len(self.turns):
      raise ValueError(f"transcript has {len(runs)} moves; the game has {len(self.turns)} turns")
    for i, ((pid, n), turn) in enumerate(zip(runs, self.turns)):
      if pid != PLAYER_NAMES[turn.player]:
        raise ValueError(f"move {i} was made by player {pid}; turn {i} is the {turn.player}'s")
      if n > turn.max_len:
        raise ValueError(f"move {i} ({turn.player}) has {n} tokens; the turn allows {turn.max_len}")


# ---- what every language game shares: tokens, legal moves, the players a seat can hold --------

MASKED = -1e9          # the logit of an illegal token


class GameConfigError(ValueError):
  """A game description that cannot be played (names the setting)."""


def token(ch: str) -> int:
  """The byte tokenizer's id of one ASCII character."""
  return OFFSET + ord(ch)


def legal_moves(apply: Callable, legal_after: np.ndarray) -> Callable:
  """``apply`` with the logit of every token that may not follow the current one set to
  ``MASKED`` (``legal_after[current, next]``): the policy is a softmax over legal moves only."""
  table = jnp.asarray(legal_after)

  def mask(logits, tokens):
    return jnp.where(table[tokens][..., :logits.shape[-1]], logits, MASKED)

  def masked(params, tokens, positions, segment_ids, **options):
    if "targets" in options:        # token log-probs read block by block (models.logprobs)
      return apply(params, tokens, positions, segment_ids, **logprobs.then(options, mask))
    out = apply(params, tokens, positions, segment_ids, **options)
    if isinstance(out, tuple):
      return (mask(out[0], tokens),) + tuple(out[1:])
    return mask(out, tokens)

  return logprobs.same_protocol(masked, apply)


SCRIPTED = "scripted_logprobs"


@dataclasses.dataclass(frozen=True)
class Scripted:
  """A seat played by one of the game's scripted players: a fixed policy, named (``"uniform"``,
  ``"nash"``, ...) or given (the game says which: ``game.scripted_policy(policy, seat)``). It
  sits in the game state as the frozen player named after its seat, ``{SCRIPTED: log-probs}``,
  the table its seat's model would compute, and is written once with the frozen players."""
  policy: Any

  def value(self, game: Any, seat: str) -> dict:
    """The frozen player: the seat's log-prob table (``MASKED`` where the policy gives 0)."""
    probs = np.asarray(game.scripted_policy(self.policy, seat), np.float64)
    logp = np.where(probs > 0, np.log(np.maximum(probs, 1e-300)), MASKED)
    return {SCRIPTED: jnp.asarray(logp, jnp.float32)}


def scripted(policy: Any) -> Scripted:
  """A scripted player for a seat: ``seats={"opponent": scripted("always_bet")}``."""
  return Scripted(policy)


def is_scripted(value: Any) -> bool:
  return isinstance(value, Mapping) and set(value) == {SCRIPTED}


def check_distribution(probs: Sequence[float], n: int, setting: str) -> np.ndarray:
  """``float64[n]``: ``probs`` when it is a distribution over ``n`` moves, else a
  ``GameConfigError`` naming ``setting``."""
  bad = (isinstance(probs, (str, bytes)) or not isinstance(probs, Sequence)
         or any(isinstance(p, bool) or not isinstance(p, numbers.Real) for p in probs))
  p = None if bad else np.asarray(probs, np.float64)
  if p is None or p.shape != (n,) or not np.isfinite(p).all() or (p < 0).any() or (
      abs(p.sum() - 1.0) > 1e-6):
    raise GameConfigError(f"{setting}: {probs!r} is not a probability distribution over {n} "
                          "moves (non-negative, summing to 1)")
  return p / p.sum()


def seat_logprobs(logprobs: Callable[[Any], jax.Array], value: Any) -> jax.Array:
  """The log-probs ``logprobs(params)`` of the player ``value`` sitting in a seat: plain params,
  a scripted player's fixed table (``Scripted``), or a geometric mixture of two players
  (``selfplay.mixture``, mixed action by action)."""
  if is_scripted(value):
    return value[SCRIPTED]
  if selfplay.is_mixture(value):
    return selfplay.mix_logprobs(logprobs(value["mixture_a"]), logprobs(value["mixture_b"]),
                                 value["beta"])
  return logprobs(value)


def per_game_logprobs(logprobs: Callable[[Any], jax.Array], value: Any, games: int,
                      key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(logp_B..., members_K..., weights_K)``: the policy each of ``games`` games is played with
  when ``value`` sits in the seat, and the players it is drawn from with their weights. A league
  draws one member per game (uniformly among the members it holds; empty slots weigh 0); any
  other player plays every game (``K = 1``)."""
  if not selfplay.is_league(value):
    logp = seat_logprobs(logprobs, value)
    return jnp.broadcast_to(logp, (games,) + logp.shape), logp[None], jnp.ones((1,), jnp.float32)
  logp_K = jax.vmap(logprobs)(value[selfplay.LEAGUE_PARAMS])
  members = selfplay.league_members(value)
  pick_B = jax.random.randint(key, (games,), 0, members)
  weights_K = (jnp.arange(logp_K.shape[0]) < members).astype(jnp.float32) / members
  return logp_K[pick_B], logp_K, weights_K
