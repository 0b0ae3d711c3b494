"""Packs variable-length transcripts into fixed ``[B, T]`` batches, resumable exactly.

Epoch ``e`` visits the examples in the order ``np.random.default_rng([seed, e]).permutation(N)``
(or ``0..N-1`` without shuffling). Examples are packed greedily, in that order, into rows: each
gets the next segment id of its row (1, 2, ...) and positions from 0; an example that does not fit
the rest of a row starts the next row (and, after the last row, the next batch). Packing runs on
across epoch boundaries. The loader's position is just ``(epoch, index)``, so
``set_state(get_state())`` on a fresh loader continues with exactly the same batches.

>>> import numpy as np
>>> src = [{"tokens": np.arange(1, n + 1), "players": np.full(n, 2)} for n in (3, 2, 4)]
>>> batch = next(PackedLoader(src, batch_size=2, seq_len=6, seed=0, shuffle=False))
>>> batch["segment_ids"].tolist()
[[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]]
>>> batch["positions"].tolist()
[[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]]
"""
from __future__ import annotations

from typing import Any

import numpy as np

from gamejax.data.errors import DataError
from gamejax.data.reader import EpochReader, source_lengths

TOO_LONG_MODES = ("truncate", "skip", "error")
BATCH_KEYS = ("tokens", "positions", "segment_ids", "players")


def _arrays(example, index: int) -> tuple[np.ndarray, np.ndarray]:
  tokens = np.asarray(example["tokens"], np.int32)
  players = np.asarray(example["players"], np.int32)
  if tokens.ndim != 1 or tokens.shape != players.shape:
    raise DataError(f"example {index} of the source: tokens {tokens.shape} and players "
                     f"{players.shape} must be 1-D of the same length")
  return tokens, players


class PackedLoader(EpochReader):
  """Infinite iterator of packed NumPy batches ``dict(tokens, positions, segment_ids, players)``.

  Every field is ``int32[batch_size, seq_len]`` (the fields of ``gamejax.records.GameRecord``).
  ``source``: anything with ``len()`` and ``[i]`` -> dict with "tokens" and "players" (bulk
  ``__getitems__`` is used when present; with ``lengths()`` -> tokens per example, batches are
  planned without decoding and only the examples of the kept rows are read). Records longer
  than ``seq_len`` are cut to ``seq_len`` (``too_long="truncate"``), dropped ("skip") or raise
  ("error"); empty records are skipped.
  ``stats`` counts examples packed, truncated and skipped. Decoded examples are cached in memory
  when the source has at most ``cache_limit`` examples; otherwise ``fetch_size`` are read at once.
  """

  def __init__(self, source, batch_size: int, seq_len: int, seed: int, shuffle: bool = True,
               too_long: str = "truncate", cache_limit: int = 200_000, fetch_size: int = 512):
    if too_long not in TOO_LONG_MODES:
      raise DataError(f"too_long={too_long!r} is not one of {TOO_LONG_MODES}")
    if int(batch_size) < 1 or int(seq_len) < 1:
      raise DataError(f"batch_size={batch_size} and seq_len={seq_len} must be >= 1")
    super().__init__(source, seed, shuffle, cache_limit, fetch_size)
    self.batch_size, self.seq_len, self.too_long = int(batch_size), int(seq_len), too_long
    self._batches = 0
    self._stats = {"examples": 0, "truncated": 0, "skipped": 0}
    self._lengths = source_lengths(source, self._num)

  def _decode(self, example, index: int) -> tuple[np.ndarray, np.ndarray]:
    return _arrays(example, index)

  # -- iteration ---------------------------------------------------------------------------------

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    b, t = self.batch_size, self.seq_len
    placed, self._epoch, self._index, self._stats = self._plan(b, t)
    kept = set(self._kept(b))
    placed = [p for p in placed if p[0] in kept]
    if self._lengths is not None:        # only the examples of this process's rows are read
      self._prefetch([(epoch, pos) for _, _, _, epoch, pos in placed])
    out = {k: np.zeros((b, t), np.int32) for k in BATCH_KEYS}
    seg = {}
    for row, col, n, epoch, pos in placed:
      tokens, players = self._fetch(epoch, pos)
      seg[row] = seg.get(row, 0) + 1
      out["tokens"][row, col:col + n] = tokens[:n]
      out["players"][row, col:col + n] = players[:n]
      out["segment_ids"][row, col:col + n] = seg[row]
      out["positions"][row, col:col + n] = np.arange(n, dtype=np.int32)
    self._batches += 1
    return self._local(out)

  def _length(self, epoch: int, pos: int) -> int:
    """Tokens in the example at ``(epoch, pos)``: from the source's lengths when it has them
    (nothing decoded), else by decoding it."""
    if self._lengths is not None:
      return int(self._lengths[int(self.order(epoch)[pos])])
    return len(self._fetch(epoch, pos)[0])

  def _plan(self, b: int, t: int):
    """Where the next batch's examples go, from their lengths alone: ``([(row, col, n, epoch,
    pos)], epoch, index, stats)`` after it. A row's place depends on every example before it, so
    every process plans the whole batch, and reads only its own rows' examples."""
    epoch, pos = self._epoch, self._index
    stats = dict(self._stats)
    placed, row, col, skips_in_a_row = [], 0, 0, 0
    while row < b:
      if pos >= self._num:
        epoch, pos = epoch + 1, 0
      n = self._length(epoch, pos)
      if n == 0 or (n > t and self.too_long == "skip"):
        stats["skipped"] += 1
        pos, skips_in_a_row = pos + 1, skips_in_a_row + 1
        if skips_in_a_row >= 2 * self._num:  # a whole epoch and more, nothing packed
          raise DataError(f"every example of {self._what} is skipped (empty, or longer than "
                           f"seq_len={t} with too_long='skip')")
        continue
      truncated = n > t
      if truncated:
        if self.too_long == "error":
          raise DataError(
              f"example {int(self.order(epoch)[pos])} of {self._what} has {n} tokens, more than "
              f"seq_len={t} (too_long='error'; use 'truncate' or 'skip')")
        n = t
      if col + n > t:  # does not fit the rest of this row: it starts the next one
        row, col = row + 1, 0
        continue
      placed.append((row, col, n, epoch, pos))
      col += n
      pos, skips_in_a_row = pos + 1, 0
      stats["examples"] += 1
      stats["truncated"] += int(truncated)
    return placed, epoch, pos, stats

  # -- state -------------------------------------------------------------------------------------

  @property
  def stats(self) -> dict[str, int]:
    """Counts so far (restored by ``set_state``): examples packed, truncated, skipped."""
    return dict(self._stats)

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position: epoch, index within its order, batches, stats, and settings."""
    return {**self._order_state(), "batches": self._batches, "stats": dict(self._stats),
            "batch_size": self.batch_size, "seq_len": self.seq_len, "too_long": self.too_long}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from ``state`` (of ``get_state``); seed, shuffle and source size must match."""
    self._epoch, self._index = self._position_from(state)
    self._batches = int(state.get("batches", 0))
    self._stats = {k: int(state.get("stats", {}).get(k, 0)) for k in self._stats}
