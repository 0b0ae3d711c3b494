"""Batches of preference pairs: ``[2P, T]`` records, chosen rows first, resumable exactly.

Each example of the source is one pair (``chosen_tokens``, ``chosen_players``,
``rejected_tokens``, ``rejected_players``, as ``gamejax.data.preferences`` builds them). A batch
holds ``P`` pairs, one transcript per row, right-padded with 0 (``NOBODY``, segment 0): pair ``i``
of the batch is rows ``(i, P + i)``, the layout of ``gamejax.payoffs.preference``. Epoch ``e``
visits the pairs in the order ``np.random.default_rng([seed, e]).permutation(N)`` (or ``0..N-1``
without shuffling), running on across epoch boundaries; ``set_state(get_state())`` on a fresh
loader continues with exactly the same batches.

Every pair is checked when it is first read: each side needs agent tokens, the two sides must
differ and share their prompt (the opponent's tokens), and each must fit ``seq_len``; a bad pair
raises ``DataError`` naming the example.

>>> import numpy as np
>>> pair = {"chosen_tokens": [1, 7, 8, 2], "chosen_players": [2, 2, 1, 1],
...         "rejected_tokens": [1, 7, 9, 9, 2], "rejected_players": [2, 2, 1, 1, 1]}
>>> batch = next(PairLoader([pair], pairs_per_batch=1, seq_len=6, seed=0))
>>> batch["tokens"].tolist()
[[1, 7, 8, 2, 0, 0], [1, 7, 9, 9, 2, 0]]
>>> batch["segment_ids"].tolist()
[[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]]
"""
from __future__ import annotations

from typing import Any

import numpy as np

from gamejax.data.errors import DataError
from gamejax.data.loader import BATCH_KEYS
from gamejax.data.reader import EpochReader
from gamejax.records import AGENT, OPPONENT

SIDES = ("chosen", "rejected")

Side = tuple[np.ndarray, np.ndarray]


class PairLoader(EpochReader):
  """Infinite iterator of preference batches ``dict(tokens, positions, segment_ids, players)``.

  Every field is ``int32[2 * pairs_per_batch, seq_len]`` (the fields of ``GameRecord``).
  ``source``: anything with ``len()`` and ``[i]`` -> a pair dict (bulk ``__getitems__`` is used
  when present). Checked pairs are cached in memory when the source has at most ``cache_limit``
  examples; otherwise ``fetch_size`` are read at once.
  """

  kind, unit = "pair loader", "preference pairs"

  def __init__(self, source, pairs_per_batch: int, seq_len: int, seed: int, shuffle: bool = True,
               cache_limit: int = 200_000, fetch_size: int = 512):
    if int(pairs_per_batch) < 1 or int(seq_len) < 1:
      raise DataError(f"pairs_per_batch={pairs_per_batch} and seq_len={seq_len} must be >= 1")
    self.pairs_per_batch, self.seq_len = int(pairs_per_batch), int(seq_len)
    super().__init__(source, seed, shuffle, cache_limit, fetch_size)
    self._batches = 0

  # -- checks ------------------------------------------------------------------------------------

  def _side(self, example, index: int, side: str) -> Side:
    where = f"example {index} of {self._what}"
    try:
      tokens = np.asarray(example[f"{side}_tokens"], np.int32)
      players = np.asarray(example[f"{side}_players"], np.int32)
    except KeyError as err:
      have = sorted(example) if hasattr(example, "keys") else type(example).__name__
      raise DataError(f"{where} lacks {err.args[0]!r}: a preference pair needs chosen_tokens, "
                      f"chosen_players, rejected_tokens and rejected_players; it has {have}") from None
    if tokens.ndim != 1 or tokens.shape != players.shape:
      raise DataError(f"{where}: {side} tokens {tokens.shape} and players {players.shape} must be "
                      f"1-D of the same length")
    if not (players == AGENT).any():
      raise DataError(f"{where}: the {side} side has no agent tokens (an empty answer; "
                      f"{len(tokens)} tokens in all)")
    if len(tokens) > self.seq_len:
      raise DataError(f"{where}: the {side} side has {len(tokens)} tokens, more than "
                      f"seq_len={self.seq_len}")
    return tokens, players

  def _decode(self, example, index: int) -> tuple[Side, Side]:
    chosen, rejected = (self._side(example, index, side) for side in SIDES)
    where = f"example {index} of {self._what}"
    if np.array_equal(chosen[0], rejected[0]):
      raise DataError(f"{where}: chosen and rejected are identical ({len(chosen[0])} tokens); "
                      f"a preference pair needs two different transcripts")
    prompts = [tokens[players == OPPONENT] for tokens, players in (chosen, rejected)]
    if not np.array_equal(*prompts):
      raise DataError(f"{where}: chosen and rejected answer different prompts (opponent tokens "
                      f"{prompts[0].tolist()} vs {prompts[1].tolist()})")
    return chosen, rejected

  # -- iteration ---------------------------------------------------------------------------------

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    p, t = self.pairs_per_batch, self.seq_len
    positions = self._positions(p)                  # pair i: rows i (chosen) and p + i (rejected)
    kept = self._kept(2 * p)
    pairs = sorted({r % p for r in kept})
    if self.rows is not None:
      self._prefetch([positions[i] for i in pairs])
    out = {k: np.zeros((len(kept), t), np.int32) for k in BATCH_KEYS}
    for i in pairs:
      for r, (tokens, players) in zip((i, p + i), self._fetch(*positions[i])):
        if r not in kept:
          continue
        row, n = r - kept.start, len(tokens)
        out["tokens"][row, :n] = tokens
        out["players"][row, :n] = players
        out["segment_ids"][row, :n] = 1
        out["positions"][row, :n] = np.arange(n, dtype=np.int32)
    epoch, pos = positions[-1]
    self._epoch, self._index = epoch, pos + 1
    self._batches += 1
    return out

  # -- state -------------------------------------------------------------------------------------

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position: epoch, index within its order, batches, and settings."""
    return {**self._order_state(), "batches": self._batches,
            "pairs_per_batch": self.pairs_per_batch, "seq_len": self.seq_len}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from ``state`` (of ``get_state``); seed, shuffle and source size must match."""
    self._epoch, self._index = self._position_from(state)
    self._batches = int(state.get("batches", 0))
