"""Offline preference payoffs: DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023) for a policy,
and the Bradley-Terry loss (Bradley & Terry 1952; Ouyang et al. 2022) for a reward model.

A preference batch is a ``GameRecord`` with ``2P`` rows, one transcript per row: rows ``[0, P)``
are the chosen transcripts and rows ``[P, 2P)`` the rejected ones, so pair ``i`` is
``(row i, row P + i)`` (same prompt, different agent answers). The frozen reference model's
per-token log-probs arrive in ``play.judgments["reference_token_logprobs"]`` (``float32[2P, T]``,
index ``t`` holding token ``t+1``'s, as ``gamejax.players.reference`` computes them for every
moved token); a payoff sums those of the tokens its ``players`` moved, the same tokens as the
policy's sums, and treats them as constants. ``bradley_terry`` trains a reward
model (``gamejax.models.reward``) on the same layout; it needs no reference.

>>> pref = dpo(beta=0.1)
>>> mix = weighted({"dpo": (1.0, dpo()), "sft": (0.1, imitation(("agent",)))})  # doctest: +SKIP
"""
from __future__ import annotations

from typing import Callable, Sequence

import chex
import jax
import jax.numpy as jnp

from gamejax import records
from gamejax.models.reward import sequence_scores
from gamejax.payoffs.base import Payoff, Play, token_logprobs
from gamejax.payoffs.imitation import token_log_likelihood

REFERENCE_TOKEN_LOGPROBS = "reference_token_logprobs"

PairLoss = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, float], jax.Array]


def sequence_logprobs(logits_BTV: jax.Array, moves: records.GameRecord,
                      players: Sequence[str | int] = ("agent",)) -> jax.Array:
  """``float32[B]``: per row, the summed log-prob of the tokens moved by ``players``.

  Packed rows sum over all their segments; preference batches hold one transcript per row.
  """
  chex.assert_rank([logits_BTV, moves.tokens], [3, 2])
  chex.assert_equal_shape_prefix([logits_BTV, moves.tokens], 2)
  weights_BT = records.next_token_weights(moves, records.player_ids(players))
  loglik_BT = token_log_likelihood(logits_BTV, records.next_tokens(moves))
  return (loglik_BT * weights_BT).sum(axis=-1)


def _logratio_margin(pi_c, pi_r, ref_c, ref_r):
  """(chosen log-ratio) - (rejected log-ratio), references held constant."""
  ref_c, ref_r = jax.lax.stop_gradient(ref_c), jax.lax.stop_gradient(ref_r)
  return (pi_c - ref_c) - (pi_r - ref_r)


def dpo_pair_loss(pi_c, pi_r, ref_c, ref_r, beta):
  """DPO loss of one pair: ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``."""
  chex.assert_rank([pi_c, pi_r, ref_c, ref_r], 0)
  return -jax.nn.log_sigmoid(beta * _logratio_margin(pi_c, pi_r, ref_c, ref_r))


def ipo_pair_loss(pi_c, pi_r, ref_c, ref_r, beta):
  """IPO loss of one pair: ``((pi_c - ref_c) - (pi_r - ref_r) - 1 / (2 beta))**2``."""
  chex.assert_rank([pi_c, pi_r, ref_c, ref_r], 0)
  return (_logratio_margin(pi_c, pi_r, ref_c, ref_r) - 1.0 / (2.0 * beta)) ** 2


def _preference(pair_loss: PairLoss, beta: float, players: Sequence[str | int],
                name: str, average_log_probs: bool = False) -> Payoff:
  """The payoff ``-mean_i pair_loss(pair i)`` over a chosen-then-rejected preference batch.

  With ``average_log_probs`` the policy's and the reference's sequence log-probs are divided by
  the row's number of scored tokens (per-token averages, as TRL's IPO uses them)."""
  if not beta > 0:
    raise ValueError(f"{name}: beta must be > 0, got {beta}")
  ids = records.player_ids(players)
  batched_loss = jax.vmap(pair_loss, in_axes=(0, 0, 0, 0, None))

  def payoff(params, play: Play):
    moves = play.moves
    rows = moves.shape[0]
    if rows % 2:
      raise ValueError(f"{name}: a preference batch needs an even number of rows (chosen rows then "
                       f"rejected rows); got moves of shape {moves.shape}")
    if REFERENCE_TOKEN_LOGPROBS not in play.judgments:
      raise KeyError(f"{name}: play.judgments lacks {REFERENCE_TOKEN_LOGPROBS!r} (float32"
                     f"{list(moves.shape)}, the frozen reference's per-token log-probs); have "
                     f"{sorted(play.judgments)}")
    ref_BT = jnp.asarray(play.judgments[REFERENCE_TOKEN_LOGPROBS], jnp.float32)
    chex.assert_shape(ref_BT, moves.shape)
    weights_BT = records.next_token_weights(moves, ids)
    ref_2P = jax.lax.stop_gradient((ref_BT * weights_BT).sum(axis=-1))
    logp_2P = (token_logprobs(play.apply, params, moves).logprobs * weights_BT).sum(axis=-1)
    if average_log_probs:
      n_2P = jnp.maximum(weights_BT.sum(axis=-1), 1.0)
      logp_2P, ref_2P = logp_2P / n_2P, ref_2P / n_2P
    p = rows // 2
    pi_c_P, pi_r_P = logp_2P[:p], logp_2P[p:]
    ref_c_P, ref_r_P = ref_2P[:p], ref_2P[p:]
    loss_P = batched_loss(pi_c_P, pi_r_P, ref_c_P, ref_r_P, beta)
    chosen_P, rejected_P = pi_c_P - ref_c_P, pi_r_P - ref_r_P
    margin_P = beta * (chosen_P - rejected_P)
    loss = loss_P.mean()
    metrics = {"loss": loss, "reward_margin": margin_P.mean(),
               "accuracy": (margin_P > 0).astype(jnp.float32).mean(),
               "chosen_logratio": chosen_P.mean(), "rejected_logratio": rejected_P.mean()}
    return -loss, metrics

  payoff.__qualname__ = name        # what `gamejax train --dry_run` calls it
  return payoff


def dpo(beta: float = 0.1, players: Sequence[str | int] = ("agent",),
        average_log_probs: bool = False) -> Payoff:
  """Direct Preference Optimisation (Rafailov et al. 2023) as a payoff: minus the mean DPO loss."""
  return _preference(dpo_pair_loss, beta, players, "dpo", average_log_probs)


def ipo(beta: float = 0.1, players: Sequence[str | int] = ("agent",),
        average_log_probs: bool = False) -> Payoff:
  """Identity Preference Optimisation (Azar et al. 2023) as a payoff: minus the mean IPO loss.

  The published loss uses summed log-probs; its target margin ``1 / (2 beta)`` is then small
  against long answers. ``average_log_probs=True`` uses per-token averages (as TRL does)."""
  return _preference(ipo_pair_loss, beta, players, "ipo", average_log_probs)


def bradley_terry_pair_loss(s_c, s_r):
  """Bradley-Terry loss of one pair of scalar scores: ``-log sigmoid(s_c - s_r)``."""
  chex.assert_rank([s_c, s_r], 0)
  chex.assert_type([s_c, s_r], float)
  return -jax.nn.log_sigmoid(s_c - s_r)


def bradley_terry(players: Sequence[str | int] = ("agent",)) -> Payoff:
  """Bradley-Terry reward-model training as a payoff: ``mean_i log sigmoid(s_c_i - s_r_i)``.

  ``play.apply(params, tokens, positions, segment_ids)`` is the reward model's per-position
  scores ``float32[2P, T]`` (``gamejax.models.reward.apply``); a transcript's score ``s`` is the
  score at its last token moved by ``players`` (``reward.sequence_scores``). Metrics: ``loss``,
  ``accuracy`` (fraction of pairs with ``s_c > s_r``), ``margin`` (mean ``s_c - s_r``),
  ``chosen_score`` and ``rejected_score`` (means).

  >>> import numpy as np, jax.numpy as jnp
  >>> moves = records.from_transcripts([(np.array([1, 5, 2]), np.array([2, 1, 1])),
  ...                                   (np.array([1, 6, 2]), np.array([2, 1, 1]))], 4)
  >>> apply = lambda params, tokens, positions, segments: params[tokens]  # a score per token id
  >>> value, metrics = bradley_terry()(jnp.arange(8.0), Play(apply, moves, {}, None))
  >>> round(float(value), 4), float(metrics["accuracy"])  # both rows end at EOS (id 2): s_c = s_r
  (-0.6931, 0.0)
  """
  ids = records.player_ids(players)
  batched_loss = jax.vmap(bradley_terry_pair_loss)

  def payoff(params, play: Play):
    moves = play.moves
    if moves.shape[0] % 2:
      raise ValueError(f"bradley_terry: a preference batch needs an even number of rows (chosen "
                       f"rows then rejected rows); got moves of shape {moves.shape}")
    p = moves.shape[0] // 2
    scores_BT = play.apply(params, moves.tokens, moves.positions, moves.segment_ids)
    chex.assert_rank(scores_BT, 2)
    chex.assert_type(scores_BT, float)
    chex.assert_equal_shape([scores_BT, moves.tokens])
    s_2P = sequence_scores(scores_BT, moves, ids)
    s_c_P, s_r_P = s_2P[:p], s_2P[p:]
    loss = batched_loss(s_c_P, s_r_P).mean()
    margin_P = s_c_P - s_r_P
    metrics = {"loss": loss, "accuracy": (margin_P > 0).astype(jnp.float32).mean(),
               "margin": margin_P.mean(), "chosen_score": s_c_P.mean(),
               "rejected_score": s_r_P.mean()}
    return -loss, metrics

  return payoff
