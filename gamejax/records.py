"""Game records: a batch of transcripts in which every token knows which player moved it.

A record batch has static shapes ``[B, T]``. Several transcripts may be packed into one row; each
transcript is a *segment* with its own ``segment_id`` (1, 2, ...) and positions restarting at 0.
Padding has ``segment_id == 0`` and ``player == NOBODY``. Tokens of the game itself (a dealt card,
a seat's label) are moved by ``CHANCE``: nobody learns to predict them.

A game has two seats, ``agent`` (player 1) and ``opponent`` (player 2). Whatever a judge says about
one seat is namespaced by it: ``seat_key("opponent", "rewards") == "opponent/rewards"``.

Token ``t+1`` is predicted from tokens ``<= t`` of the same segment, so the loss weight of
position ``t`` belongs to the player who moved token ``t+1``.

>>> import numpy as np
>>> r = from_transcripts([(np.array([1, 5, 6, 7]), np.array([OPPONENT, OPPONENT, AGENT, AGENT]))], 6)
>>> r.segment_ids.tolist()
[[1, 1, 1, 1, 0, 0]]
>>> next_token_weights(r, (AGENT,)).tolist()
[[0.0, 1.0, 1.0, 0.0, 0.0, 0.0]]
"""
from __future__ import annotations

from typing import Iterable, Sequence

import flax.struct
import jax.numpy as jnp
import numpy as np

NOBODY, AGENT, OPPONENT, CHANCE = 0, 1, 2, 3
PLAYER_NAMES = {"agent": AGENT, "opponent": OPPONENT}
SEATS = ("agent", "opponent")       # the two seats of every game, in player-id order
OTHER_SEAT = {"agent": "opponent", "opponent": "agent"}


@flax.struct.dataclass
class SharedPrompt:
  """What a record's rows share: row ``i`` opens with its group's prompt, the ``prompt_lengths[i]``
  tokens that the ``group_size`` rows ``g*G .. g*G+G-1`` all open with (prompts of at most ``width``
  tokens, the play's prompt batch). A sampled play's record says so (``sampled_play(...,
  share_prompt=True)``), and a forward may then compute each group's prompt once
  (``gamejax.models.shared_prompt``) for the same logits as a forward over every row.

  The rows are right-aligned, one transcript each (a sampled play's record): row ``i``'s tokens fill
  its last ``sum(segment_ids[i] > 0)`` slots, its prompt first."""
  prompt_lengths: jnp.ndarray                                  # int32[B]
  group_size: int = flax.struct.field(pytree_node=False)
  width: int = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class GameRecord:
  """A batch of (possibly packed) transcripts; every field is ``int32[B, T]``, except
  ``shared_prompt``: None, or what the rows share (``SharedPrompt``), so that a forward over them
  may compute a group's prompt once; and ``opening`` (static): the record's first ``opening``
  slots hold no token sampled in the game that wrote it, only what it opened with (a sampled
  play's prompts from data, left-padded to their width), so that a reader of sampled moves alone
  (the RL payoffs' log-probs, the reference's) may skip them (``payoffs.base.token_logprobs``).
  0: nothing is known, every slot is read."""
  tokens: jnp.ndarray
  positions: jnp.ndarray
  segment_ids: jnp.ndarray
  players: jnp.ndarray
  shared_prompt: SharedPrompt | None = None
  opening: int = flax.struct.field(pytree_node=False, default=0)

  @property
  def shape(self):
    return self.tokens.shape


def seat_key(seat: str, key: str) -> str:
  """The judgment key of ``key`` for ``seat``: ``"agent/rewards"``, ``"opponent/rewards"``."""
  if seat not in PLAYER_NAMES:
    raise ValueError(f"unknown seat {seat!r}; expected one of {list(SEATS)}")
  return f"{seat}/{key}"


def player_ids(players: Sequence[str | int]) -> tuple[int, ...]:
  """Maps player names ('agent', 'opponent') or ids to ids, rejecting unknown names."""
  ids = []
  for p in players:
    if isinstance(p, str):
      if p not in PLAYER_NAMES:
        raise ValueError(f"unknown player {p!r}; expected one of {sorted(PLAYER_NAMES)}")
      ids.append(PLAYER_NAMES[p])
    else:
      ids.append(int(p))
  return tuple(ids)


def next_token_weights(record: GameRecord, players: Sequence[str | int]):
  """``float32[B, T]``: 1 where token ``t+1`` continues the segment and was moved by ``players``."""
  xp = np if isinstance(record.tokens, np.ndarray) else jnp
  ids = player_ids(players)
  nxt_players = xp.concatenate([record.players[:, 1:], xp.zeros_like(record.players[:, :1])], axis=1)
  nxt_segments = xp.concatenate(
      [record.segment_ids[:, 1:], xp.zeros_like(record.segment_ids[:, :1])], axis=1)
  same = (nxt_segments == record.segment_ids) & (record.segment_ids > 0)
  moved = xp.zeros(record.players.shape, dtype=bool)
  for i in ids:
    moved = moved | (nxt_players == i)
  return (same & moved).astype(xp.float32)


def next_tokens(record: GameRecord):
  """``int32[B, T]``: the token each position predicts (0 past the end of the row)."""
  xp = np if isinstance(record.tokens, np.ndarray) else jnp
  return xp.concatenate([record.tokens[:, 1:], xp.zeros_like(record.tokens[:, :1])], axis=1)


def from_transcripts(transcripts: Iterable[tuple[np.ndarray, np.ndarray]], seq_len: int,
                     batch_size: int | None = None) -> GameRecord:
  """Builds an unpacked record batch (one transcript per row, right-padded) in NumPy."""
  transcripts = list(transcripts)
  b = batch_size or len(transcripts)
  tokens = np.zeros((b, seq_len), np.int32)
  players = np.zeros((b, seq_len), np.int32)
  segments = np.zeros((b, seq_len), np.int32)
  positions = np.zeros((b, seq_len), np.int32)
  for row, (tok, ply) in enumerate(transcripts):
    n = len(tok)
    if n > seq_len:
      raise ValueError(f"transcript {row} has {n} tokens, longer than seq_len={seq_len}")
    tokens[row, :n] = tok
    players[row, :n] = ply
    segments[row, :n] = 1
    positions[row, :n] = np.arange(n)
  return GameRecord(tokens=tokens, positions=positions, segment_ids=segments, players=players)
