"""Held-out evaluation of a reward model: how often it scores the chosen answer of a preference
pair above the rejected one (pairs of the test split, never trained on)."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from gamejax import records
from gamejax.data.pairs import PairLoader
from gamejax.models import lm, reward


def pair_accuracy(cfg: lm.Config, params: Any, source, seq_len: int,
                  pairs_per_batch: int = 128, max_pairs: int = 1000) -> dict:
  """``{"pair_accuracy", "margin", "n"}`` over the first ``max_pairs`` pairs of ``source``
  (ties count as wrong)."""
  n = min(len(source), max_pairs)
  loader = PairLoader(source, pairs_per_batch, seq_len, seed=0, shuffle=False)

  @jax.jit
  def scores(params, batch):
    record = records.GameRecord(**batch)
    return reward.sequence_scores(
        reward.apply(cfg, params, record.tokens, record.positions, record.segment_ids), record)

  wins, margins = [], []
  while len(wins) < n:
    s = np.asarray(scores(params, next(loader)))
    chosen, rejected = s[:pairs_per_batch], s[pairs_per_batch:]
    wins.extend((chosen > rejected).tolist())
    margins.extend((chosen - rejected).tolist())
  return {"pair_accuracy": float(np.mean(wins[:n])), "margin": float(np.mean(margins[:n])), "n": n}
