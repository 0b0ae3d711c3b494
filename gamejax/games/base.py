"""Turn structure, part of every game's definition: who moves when, and for how many tokens.

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
from typing import Sequence

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
