"""Imitation: the payoff of predicting the moves of chosen players from the game record.

``imitation(players=("agent", "opponent"))`` is pre-training (every token of the record);
``imitation(players=("agent",))`` is SFT (the agent's moves given the opponent's).

>>> pretrain, sft = imitation(("agent", "opponent")), imitation(("agent",))
"""
from __future__ import annotations

from typing import Sequence

import chex
import jax
import jax.numpy as jnp

from gamejax import records
from gamejax.models import logprobs
from gamejax.payoffs.base import Payoff, Play, token_logprobs


def token_log_likelihood(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """``float32[B, T]``: log p(target) under ``logits`` (stable log-softmax in float32)."""
  chex.assert_rank([logits_BTV, targets_BT], [3, 2])
  return logprobs.score(logits_BTV, targets_BT).logprobs


ROWS = ("all", "chosen")


def imitation(players: Sequence[str] = ("agent",), rows: str = "all") -> Payoff:
  """Mean log-likelihood of the tokens moved by ``players`` (the payoff of imitating them).

  ``rows="chosen"`` imitates only the first half of the rows: the chosen transcripts of a
  preference batch (``gamejax.payoffs.preference``'s layout), e.g. the NLL term that keeps DPO's
  chosen log-probs from falling with the rejected ones (iterative RPO, Pang et al. 2024):
  ``weighted({"dpo": (1.0, dpo()), "nll": (alpha, imitation(rows="chosen"))})``."""
  ids = records.player_ids(players)
  if rows not in ROWS:
    raise ValueError(f"imitation: rows={rows!r}; expected one of {ROWS}")

  def payoff(params, play: Play):
    moves = play.moves
    scored = token_logprobs(play.apply, params, moves)
    weights_BT = records.next_token_weights(moves, ids)
    if rows == "chosen":
      b = weights_BT.shape[0]
      if b % 2:
        raise ValueError(f"imitation(rows='chosen'): a preference batch needs an even number of "
                         f"rows (chosen rows then rejected rows); got moves of shape {moves.shape}")
      weights_BT = weights_BT * (jnp.arange(b) < b // 2)[:, None]
    n = jnp.maximum(weights_BT.sum(), 1.0)
    value = (scored.logprobs * weights_BT).sum() / n
    correct_BT = (scored.argmax == records.next_tokens(moves)).astype(jnp.float32)
    metrics = {"loss": -value, "token_accuracy": (correct_BT * weights_BT).sum() / n,
               "tokens": weights_BT.sum()}
    return value, metrics

  payoff.players = ids       # held-out loss is measured on the same players' moves
  return payoff
