"""Byte-level tokenizer: no vocabulary files, every UTF-8 string round-trips.

Ids: 0 = PAD, 1 = BOS, 2 = EOS, byte ``b`` -> ``b + 3``; ``VOCAB_SIZE`` = 259 (models round up).

>>> tok = ByteTokenizer()
>>> tok.decode(tok.encode("12+3="))
'12+3='
"""
from __future__ import annotations

import numpy as np

PAD, BOS, EOS = 0, 1, 2
OFFSET = 3
VOCAB_SIZE = 256 + OFFSET


class ByteTokenizer:
  pad_id, bos_id, eos_id, vocab_size = PAD, BOS, EOS, VOCAB_SIZE

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + OFFSET

  def decode(self, ids) -> str:
    ids = np.asarray(ids).reshape(-1)
    data = bytes(int(i) - OFFSET for i in ids if OFFSET <= int(i) < VOCAB_SIZE)
    return data.decode("utf-8", errors="replace")

  def decode_until_eos(self, ids) -> str:
    ids = list(np.asarray(ids).reshape(-1))
    if EOS in ids:
      ids = ids[:ids.index(EOS)]
    return self.decode(ids)
