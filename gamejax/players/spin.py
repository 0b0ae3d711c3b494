"""SPIN (Chen et al. 2024): the agent plays against its own previous iterate on the demonstrations.

Each step the previous iterate (a frozen follower of the agent, refreshed every iteration) answers
the demonstrations' prompts; the step's moves are a preference batch (``gamejax.payoffs.preference``
layout): rows ``[0, P)`` the demonstrator's records (chosen), rows ``[P, 2P)`` the same prompts
with the previous iterate's sampled answers (rejected). With the previous iterate as DPO's
reference too, ``dpo(beta)`` on these moves is SPIN's loss

    -log sigmoid(beta * (log p(y|x)/p_t(y|x) - log p(y'|x)/p_t(y'|x))),  y' ~ p_t(.|x)

(logistic loss, ``lambda = beta``). Nothing here is new data: the chosen answers are the SFT
records, the rejected ones the model's own.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from gamejax import records
from gamejax.players import judges
from gamejax.players.policy import PROMPT_KEYS

OPPONENT = "reference"     # the previous iterate: the rejected answers' sampler and DPO's reference


def answer_tokens(record: records.GameRecord, width: int) -> jax.Array:
  """``int32[B, width]``: each row's agent tokens from its first one on (PAD after them)."""
  agent_BT = record.players == records.AGENT
  t = record.tokens.shape[1]
  start_B = jnp.argmax(agent_BT, axis=1)
  idx_BW = start_B[:, None] + jnp.arange(width)[None, :]
  got_BW = jnp.take_along_axis(record.tokens, jnp.clip(idx_BW, 0, t - 1), axis=1)
  moved_BW = jnp.take_along_axis(agent_BT, jnp.clip(idx_BW, 0, t - 1), axis=1) & (idx_BW < t)
  return jnp.where(moved_BW, got_BW, 0)


def _pad_to(record: records.GameRecord, t: int) -> records.GameRecord:
  pad = t - record.tokens.shape[1]
  return jax.tree.map(lambda x: jnp.pad(x, ((0, 0), (0, pad))), record)


def spin_play(sample):
  """``play(state, batch, rng)`` of SPIN from ``sample``, a ``sampled_play`` of the previous
  iterate with one answer per prompt; ``batch`` comes from a ``DemonstrationLoader``.

  Metrics: ``spin/identical`` (fraction of sampled answers equal to the demonstration: where the
  game's value reaches 0, the previous iterate has learned the data), ``spin/opponent_exact`` (the
  arena judge's exact-match rate of the sampled answers, when the batch has the answer key).
  """

  def play(state, batch, rng):
    prompts = {k: v for k, v in batch.items() if k in PROMPT_KEYS or k == judges.ANSWER_KEY}
    sampled, facts = sample(state, prompts, rng)
    chosen = records.GameRecord(**{k: jnp.asarray(batch[k], jnp.int32)
                                   for k in ("tokens", "positions", "segment_ids", "players")})
    t = max(chosen.tokens.shape[1], sampled.tokens.shape[1])
    # The demonstrations' rows are data from their first slot: nothing of the record is skipped.
    chosen, sampled = _pad_to(chosen, t), _pad_to(sampled.replace(opening=0), t)
    moves = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), chosen, sampled)
    completion_BN = facts["completion"] * (facts["completion_mask"] > 0)
    identical_B = jnp.all(answer_tokens(chosen, completion_BN.shape[1]) == completion_BN, axis=1)
    metrics = dict(facts["metrics"])
    metrics["spin/identical"] = identical_B.astype(jnp.float32).mean()
    if judges.ANSWER_KEY in facts:
      exact_B, _ = judges.graded(sampled, facts, who="spin_play")
      metrics["spin/opponent_exact"] = exact_B.astype(jnp.float32).mean()
    return moves, {"metrics": metrics}

  return play
