"""Reading a source epoch after epoch, exactly resumable: what the loaders share.

Epoch ``e`` visits the examples in the order ``np.random.default_rng([seed, e]).permutation(N)``
(or ``0..N-1`` without shuffling). Examples are decoded once by the loader's ``_decode`` and cached
(all of them when the source has at most ``cache_limit``; else the ``fetch_size`` read ahead in one
bulk ``__getitems__``). A loader's position is ``(epoch, index)``; ``_position_from`` checks a
saved state against this reader before a loader continues from it.

On several processes each runs the same loader, restricted by ``only_rows`` to the rows of each
global batch its devices hold: the order, the position and the state stay the global loader's, so
the processes' batches together are the one-process batch. A loader whose rows are examples of
their own (prompts, pairs) reads only its rows' examples. The packed loader plans the whole
batch (where a row ends depends on every example before it) from the source's ``lengths()`` when
it has them (``sources.Source`` does: one int per example, computed once and kept beside the
data) and reads only its rows' examples; a source without lengths is decoded whole.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from gamejax.data.errors import DataError

ORDER_KEYS = ("seed", "shuffle", "num_examples")  # state entries that must match on resume


def read_examples(source, indices: Sequence[int]) -> list:
  getitems = getattr(source, "__getitems__", None)
  if getitems is not None:
    return list(getitems(list(indices)))
  return [source[i] for i in indices]


def source_lengths(source, num: int) -> np.ndarray | None:
  """``source.lengths()`` (tokens per example, ``int[num]``) when the source has it, else None."""
  lengths = getattr(source, "lengths", None)
  if not callable(lengths):
    return None
  out = np.asarray(lengths())
  if out.shape != (num,) or not np.issubdtype(out.dtype, np.integer):
    raise DataError(f"source.lengths() gave {out.dtype}{list(out.shape)}; want one integer per "
                    f"example ({num})")
  return out


class EpochReader:
  """Base of the loaders: the epoch order, cached decoding, and resume checks.

  ``kind`` names the loader in errors ("loader", "pair loader", ...); ``unit`` its examples.
  """
  kind, unit = "loader", "examples"

  def __init__(self, source, seed: int, shuffle: bool, cache_limit: int = 200_000,
               fetch_size: int = 512):
    self._num = len(source)
    name = getattr(source, "name", None)
    self._what = (f"data source {name!r}" if isinstance(name, str)
                  else f"data source ({type(source).__name__} of {self._num} {self.unit})")
    if self._num == 0:
      raise DataError(f"{self._what} has zero {self.unit}")
    self.source, self.seed, self.shuffle = source, int(seed), bool(shuffle)
    self._keep_all = self._num <= cache_limit
    self._fetch_size = max(1, int(fetch_size))
    self._cache: dict[int, Any] = {}
    self._order_epoch, self._order = -1, None
    self._epoch, self._index = 0, 0
    self.rows: slice | None = None      # the rows of each batch this process holds (None: all)

  def only_rows(self, rows: slice) -> None:
    """From now on each batch holds only ``rows`` of the global batch (this process's share)."""
    self.rows = rows

  def _kept(self, rows: int) -> range:
    """Which of a global batch's ``rows`` this loader keeps."""
    return range(rows) if self.rows is None else range(*self.rows.indices(rows))

  def _local(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``batch`` (a global one) cut to the kept rows."""
    return batch if self.rows is None else {k: v[self.rows] for k, v in batch.items()}

  def _positions(self, count: int) -> list[tuple[int, int]]:
    """The ``(epoch, index)`` of the next ``count`` examples from the current position."""
    epoch, pos, out = self._epoch, self._index, []
    for _ in range(count):
      if pos >= self._num:
        epoch, pos = epoch + 1, 0
      out.append((epoch, pos))
      pos += 1
    return out

  def _prefetch(self, positions: Sequence[tuple[int, int]]) -> None:
    """Reads and decodes exactly these examples (one bulk read), so that ``_fetch`` of them reads
    nothing more: a process reads only the examples of its own rows."""
    self._read([int(self.order(e)[p]) for e, p in positions])

  def _read(self, indices: Sequence[int]) -> None:
    """Decodes examples ``indices`` into the cache in one bulk read (those not there already);
    a source too large to keep whole keeps only these."""
    if not self._keep_all:
      self._cache.clear()
    wanted = [i for i in dict.fromkeys(indices) if i not in self._cache]
    for i, ex in zip(wanted, read_examples(self.source, wanted)):
      self._cache[i] = self._decode(ex, i)

  def _decode(self, example, index: int):
    """The loader's form of example ``index`` (raises ``DataError`` for a bad one)."""
    raise NotImplementedError

  def order(self, epoch: int) -> np.ndarray:
    """The example order of ``epoch``."""
    if epoch != self._order_epoch:
      if self.shuffle:
        self._order = np.random.default_rng([self.seed, epoch]).permutation(self._num)
      else:
        self._order = np.arange(self._num)
      self._order_epoch = epoch
    return self._order

  def _fetch(self, epoch: int, pos: int):
    order = self.order(epoch)
    index = int(order[pos])
    hit = self._cache.get(index)
    if hit is not None:
      return hit
    self._read([int(i) for i in order[pos:pos + self._fetch_size]])
    return self._cache[index]

  @property
  def epoch(self) -> int:
    return self._epoch

  def _order_state(self) -> dict[str, Any]:
    return {"epoch": self._epoch, "index": self._index, "seed": self.seed,
            "shuffle": self.shuffle, "num_examples": self._num}

  def _position_from(self, state: dict[str, Any]) -> tuple[int, int]:
    """``(epoch, index)`` of a saved ``state``, after checking it belongs to this reader."""
    mine = self._order_state()
    bad = [f"{k}: state has {state.get(k)!r}, loader has {mine[k]!r}" for k in ORDER_KEYS
           if k in state and state[k] != mine[k]]
    if bad:
      raise DataError(f"{self.kind} state does not match this loader (" + "; ".join(bad) + ")")
    epoch, index = int(state["epoch"]), int(state["index"])
    if epoch < 0 or not 0 <= index <= self._num:
      raise DataError(f"{self.kind} state has invalid position epoch={epoch}, index={index} "
                      f"for {self._num} {self.unit}")
    return epoch, index
