"""A frozen reference policy as a responder: its per-token log-probs of every moved token.

The reference's params live in ``state.frozen[name]`` (set when the stage starts, usually the
policy's own initial params); it never learns. Its log-probs are constants for the payoffs, each
of which reads the tokens of the players it scores: KL terms (GRPO's k3 penalty,
``kl_to_reference``, PPO's reward penalty) the agent's, DPO and IPO those of their ``players``.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from gamejax import records
from gamejax.models import logprobs
from gamejax.payoffs import base

REFERENCE_TOKEN_LOGPROBS = "reference_token_logprobs"


def token_logprobs(apply: Callable, params, moves: records.GameRecord,
                   players=("agent",)) -> jax.Array:
  """``float32[B, T]``: at ``t``, log p(token t+1) under ``apply(params, ...)`` where ``players``
  moved token ``t+1``; 0 elsewhere."""
  if logprobs.reads_targets(apply):      # block by block, never the [B, T, V] logits
    picked_BT = base.token_logprobs(apply, params, moves, sampled_only=True).logprobs
  else:
    logits_BTV = base.apply_moves(apply, params, moves).astype(jnp.float32)
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    picked_BT = jnp.take_along_axis(logp_BTV, records.next_tokens(moves)[..., None],
                                    axis=-1)[..., 0]
  return picked_BT * records.next_token_weights(moves, records.player_ids(players))


ALL_PLAYERS = ("agent", "opponent")


def reference(apply: Callable, name: str = "reference"):
  """Responder adding the frozen player ``name``'s log-probs of every moved token
  (``"reference_token_logprobs"``, float32[B, T]: at ``t``, token ``t+1``'s; 0 on padding, and,
  read in blocks, on the record's opening: a sampled play's prompts, which no payoff of sampled
  moves reads; ``base.token_logprobs``).

  Each payoff masks them to the players it scores, so a payoff and the reference always sum
  over the same tokens."""

  def respond(state, moves, facts, rng):
    del facts, rng
    if name not in state.frozen:
      raise KeyError(f"the reference responder needs a frozen player {name!r}; the state has "
                     f"{sorted(state.frozen)}")
    lp_BT = token_logprobs(apply, state.frozen[name], moves, ALL_PLAYERS)
    return {REFERENCE_TOKEN_LOGPROBS: jax.lax.stop_gradient(lp_BT)}

  return respond
