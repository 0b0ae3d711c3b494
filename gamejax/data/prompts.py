"""Prompt batches for games in which the agent plays: the opponent's opening move of each record.

Each batch holds ``batch_size`` prompts left-padded to ``prompt_len`` (the sampler's layout) and,
for the arithmetic arena, the judge's answer key. Epoch ``e`` visits the examples in the order
``np.random.default_rng([seed, e]).permutation(N)``; the position ``(epoch, index)`` is the
loader's whole state, so ``set_state(get_state())`` continues with the same batches.

>>> src = [{"tokens": np.array([1, 60, 50, 70, 2]), "players": np.array([2, 2, 1, 1, 1]),
...         "answer": 7}]
>>> batch = next(PromptLoader(src, batch_size=2, prompt_len=3, seed=0, answer_width=2))
>>> batch["prompt"].tolist(), batch["prompt_lengths"].tolist(), batch["answer_digits"].tolist()
([[0, 1, 60], [0, 1, 60]], [2, 2], [[-1, 7], [-1, 7]])
"""
from __future__ import annotations

from typing import Any

import numpy as np

from gamejax import records
from gamejax.data.errors import DataError
from gamejax.data.loader import BATCH_KEYS
from gamejax.data.reader import EpochReader
from gamejax.games.arithmetic import answer_digits


EXAMPLE = "example"       # int32[B]: the prompt's index in its source


def opening_move(tokens, players) -> np.ndarray:
  """The leading run of tokens moved by the opponent (BOS + question in the arena)."""
  players = np.asarray(players)
  other = np.flatnonzero(players != records.OPPONENT)
  n = int(other[0]) if len(other) else len(players)
  return np.asarray(tokens[:n], np.int32)


class PromptLoader(EpochReader):
  """Infinite iterator of ``{"prompt": int32[B, L], "prompt_lengths": int32[B], "example":
  int32[B]}`` (``example``: each prompt's index in the source, which a host-side judge reads the
  prompt's text by) (+ with ``answer_width > 0``, ``"answer_digits": int32[B, answer_width]`` from
  each example's ``"answer"``). A prompt longer than ``prompt_len``, or an example without an opening move, is a
  ``DataError`` naming the example."""
  kind = "prompt loader"

  def __init__(self, source, batch_size: int, prompt_len: int, seed: int, shuffle: bool = True,
               answer_width: int = 0):
    if int(batch_size) < 1 or int(prompt_len) < 1:
      raise DataError(f"batch_size={batch_size} and prompt_len={prompt_len} must be >= 1")
    self.batch_size, self.prompt_len = int(batch_size), int(prompt_len)
    self.answer_width = int(answer_width)
    super().__init__(source, seed, shuffle)

  def _decode(self, example, index: int) -> tuple[np.ndarray, Any]:
    prompt = opening_move(example["tokens"], example["players"])
    if not 1 <= len(prompt) <= self.prompt_len:
      raise DataError(f"example {index} of {self._what}: its opening move has {len(prompt)} "
                      f"tokens; prompts need 1 to prompt_len={self.prompt_len}")
    answer = None
    if self.answer_width:
      if "answer" not in example:
        raise DataError(f"example {index} of {self._what} has no 'answer' field for the judge")
      answer = answer_digits(int(example["answer"]), self.answer_width)
    return prompt, answer

  def __iter__(self):
    return self

  def _empty(self, b: int) -> dict[str, np.ndarray]:
    length = self.prompt_len
    out = {"prompt": np.zeros((b, length), np.int32), "prompt_lengths": np.zeros((b,), np.int32),
           EXAMPLE: np.zeros((b,), np.int32)}
    if self.answer_width:
      out["answer_digits"] = np.zeros((b, self.answer_width), np.int32)
    return out

  def _fill(self, out: dict[str, np.ndarray], row: int, decoded) -> None:
    prompt, answer = decoded[:2]
    out["prompt"][row, self.prompt_len - len(prompt):] = prompt
    out["prompt_lengths"][row] = len(prompt)
    if answer is not None:
      out["answer_digits"][row] = answer

  def __next__(self) -> dict[str, np.ndarray]:
    positions = self._positions(self.batch_size)          # row r: the example at positions[r]
    kept = self._kept(self.batch_size)
    if self.rows is not None:
      self._prefetch([positions[r] for r in kept])
    out = self._empty(len(kept))
    for row, r in enumerate(kept):
      epoch, pos = positions[r]
      self._fill(out, row, self._fetch(epoch, pos))
      out[EXAMPLE][row] = self.order(epoch)[pos]
    epoch, pos = positions[-1]
    self._epoch, self._index = epoch, pos + 1
    return out

  def get_state(self) -> dict[str, Any]:
    return self._order_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._epoch, self._index = self._position_from(state)


class DemonstrationLoader(PromptLoader):
  """A ``PromptLoader`` whose batches also hold each example's whole record: the demonstration
  (``tokens``, ``positions``, ``segment_ids``, ``players``: ``int32[B, seq_len]``, one record per
  row, right-padded). SPIN's batches: the demonstrator's answer beside the prompt that the previous
  iterate answers. A record longer than ``seq_len`` is a ``DataError`` naming the example.

  >>> src = [{"tokens": np.array([1, 60, 50, 70, 2]), "players": np.array([2, 2, 1, 1, 1])}]
  >>> batch = next(DemonstrationLoader(src, batch_size=1, prompt_len=3, seed=0, seq_len=6))
  >>> batch["prompt"].tolist(), batch["tokens"].tolist(), batch["segment_ids"].tolist()
  ([[0, 1, 60]], [[1, 60, 50, 70, 2, 0]], [[1, 1, 1, 1, 1, 0]])
  """
  kind = "demonstration loader"

  def __init__(self, source, batch_size: int, prompt_len: int, seed: int, seq_len: int,
               shuffle: bool = True, answer_width: int = 0):
    if int(seq_len) < 1:
      raise DataError(f"seq_len={seq_len} must be >= 1")
    self.seq_len = int(seq_len)
    super().__init__(source, batch_size, prompt_len, seed, shuffle, answer_width)

  def _decode(self, example, index: int):
    prompt, answer = super()._decode(example, index)
    tokens = np.asarray(example["tokens"], np.int32)
    players = np.asarray(example["players"], np.int32)
    if len(tokens) > self.seq_len:
      raise DataError(f"example {index} of {self._what}: its record has {len(tokens)} tokens, "
                      f"more than seq_len={self.seq_len}")
    if not (players == records.AGENT).any():
      raise DataError(f"example {index} of {self._what}: its record has no agent move to "
                      "demonstrate")
    return prompt, answer, tokens, players

  def _empty(self, b: int) -> dict[str, np.ndarray]:
    out = super()._empty(b)
    out.update({k: np.zeros((b, self.seq_len), np.int32) for k in BATCH_KEYS})
    return out

  def _fill(self, out: dict[str, np.ndarray], row: int, decoded) -> None:
    super()._fill(out, row, decoded)
    tokens, players = decoded[2:]
    n = len(tokens)
    out["tokens"][row, :n] = tokens
    out["players"][row, :n] = players
    out["segment_ids"][row, :n] = 1
    out["positions"][row, :n] = np.arange(n, dtype=np.int32)
