"""A frozen reference policy as a responder: its per-token log-probs of the agent's moves.

The reference's params live in ``state.frozen[name]`` (set when the stage starts, usually the
policy's own initial params); it never learns. Its log-probs feed KL terms (GRPO's k3 penalty,
``kl_to_reference``) as constants.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from gamejax import records

REFERENCE_TOKEN_LOGPROBS = "reference_token_logprobs"


def token_logprobs(apply: Callable, params, moves: records.GameRecord,
                   players=("agent",)) -> jax.Array:
  """``float32[B, T]``: at ``t``, log p(token t+1) under ``apply(params, ...)`` where ``players``
  moved token ``t+1``; 0 elsewhere."""
  logits_BTV = apply(params, moves.tokens, moves.positions, moves.segment_ids).astype(jnp.float32)
  logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
  picked_BT = jnp.take_along_axis(logp_BTV, records.next_tokens(moves)[..., None], axis=-1)[..., 0]
  return picked_BT * records.next_token_weights(moves, records.player_ids(players))


REFERENCE_LOGPROBS = "reference_logprobs"


def reference(apply: Callable, name: str = "reference"):
  """Responder adding the frozen player ``name``'s log-probs of the agent's moves: per token
  (``"reference_token_logprobs"``, float32[B, T], for KL terms) and summed per row
  (``"reference_logprobs"``, float32[B], for DPO/IPO)."""

  def respond(state, moves, facts, rng):
    del facts, rng
    if name not in state.frozen:
      raise KeyError(f"the reference responder needs a frozen player {name!r}; the state has "
                     f"{sorted(state.frozen)}")
    lp_BT = jax.lax.stop_gradient(token_logprobs(apply, state.frozen[name], moves))
    return {REFERENCE_TOKEN_LOGPROBS: lp_BT, REFERENCE_LOGPROBS: lp_BT.sum(axis=-1)}

  return respond
