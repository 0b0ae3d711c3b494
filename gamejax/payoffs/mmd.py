"""Magnetic mirror descent (Sokota et al. 2023) as a payoff of one seat, and naive self-play PG.

MMD regularises each of a seat's decisions towards a *magnet* policy ``rho``:

    value = mean over rows of  sum over the seat's decisions h of
              [ policy term at h ]  -  alpha * KL(pi(.|h) || rho(.|h))

The KL is exact: the full next-token distributions at the decision (the learner's ``apply`` is
masked to the game's legal moves, so ``pi`` is a distribution over them). The magnet is the
uniform policy over the legal moves (``magnet=None``: the KL is minus the entropy plus ``log
|legal|``, entropy regularisation) or a frozen player (``magnet="magnet"``, e.g. an EMA of the
learner: ``players.selfplay.ema``, the optional magnet update), evaluated in the learner's own
``apply`` from ``play.frozen``. The policy term is

* ``estimator="sampled"``: ``(r - b) * log pi(a|h)`` for the sampled move ``a`` (REINFORCE;
  ``r`` is the seat's reward of the game, ``judgments["<seat>/rewards"]``; ``b`` the batch mean
  by default, 0 with ``baseline="none"``, or with ``baseline="role"`` the seat's role baseline --
  an EMA of its rewards over the steps, SPIRAL's role-conditioned advantages -- kept by the step
  as ``role_baselines``, ``players.selfplay.role_baselines``);
* ``estimator="all_actions"``: ``sum_v pi(v|h) q(v)`` over every move ``v``, with ``q`` from
  ``judgments["<seat>/action_values"]`` (``float32[B, V]``: what each token would have paid as
  the seat's one decision of the row; a full-feedback game's judge gives it, e.g. a matrix game).

``alpha=0`` is naive self-play policy gradient, the baseline that cycles in RPS-like games.

>>> import jax, jax.numpy as jnp, numpy as np
>>> from gamejax import records
>>> from gamejax.payoffs import Play
>>> C, A = records.CHANCE, records.AGENT
>>> moves = jax.tree.map(jnp.asarray, records.from_transcripts(
...     [(np.array([1, 4, 5]), np.array([C, C, A]))] * 2, seq_len=3))
>>> apply = lambda params, tokens, positions, segment_ids: params[tokens]   # bigram logits
>>> play = Play(apply, moves, {"agent/rewards": jnp.array([1.0, 0.0])}, jax.random.PRNGKey(0))
>>> value, metrics = mmd(alpha=1.0)(jnp.zeros((8, 8)), play)   # uniform pi: KL 0, A = +-0.5
>>> float(value), round(float(metrics["kl"]), 6)
(0.0, 0.0)
"""
from __future__ import annotations

from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp

from gamejax import records
from gamejax.payoffs.base import Payoff, Play, frozen_player, moves_logits
from gamejax.payoffs.kl import read_judgment
from gamejax.payoffs.policy_gradient import ROLE_BASELINES, check_baseline, seat_baseline

ESTIMATORS = ("sampled", "all_actions")
LEGAL = -1e8          # logits at or below this are illegal moves (the games mask them to -1e9)


def kl_to_magnet(logp_BTV: jax.Array, magnet_logp_BTV: jax.Array | None,
                 legal_BTV: jax.Array) -> jax.Array:
  """``float32[B, T]``: ``KL(pi || rho)`` at every position over the legal moves; ``rho``
  uniform over them when ``magnet_logp_BTV`` is None."""
  chex.assert_rank([logp_BTV, legal_BTV], 3)
  p_BTV = jnp.exp(logp_BTV)
  if magnet_logp_BTV is None:
    n_BT = jnp.maximum(legal_BTV.sum(-1), 1).astype(jnp.float32)
    magnet_logp_BTV = jnp.broadcast_to(-jnp.log(n_BT)[..., None], logp_BTV.shape)
  terms_BTV = jnp.where(legal_BTV, p_BTV * (logp_BTV - magnet_logp_BTV), 0.0)
  return terms_BTV.sum(-1)


def mmd(seat: str | Sequence[str] = "agent", alpha: float = 0.05, magnet: str | None = None,
        estimator: str = "sampled", baseline: str = "batch_mean",
        role_baselines: str = ROLE_BASELINES) -> Payoff:
  """The MMD payoff of ``seat`` (see the module docstring); ``alpha=0``: naive policy gradient.

  ``seat`` may name both seats (``("agent", "opponent")``): self-play, one model scored in each
  seat with its own rewards, the sum of the two values from one forward pass (metrics under
  ``agent/...`` and ``opponent/...``)."""
  seats = (seat,) if isinstance(seat, str) else tuple(seat)
  for s in seats:
    records.seat_key(s, "rewards")
  if not seats or len(set(seats)) != len(seats):
    raise ValueError(f"mmd: seat must name distinct seats; got {seat!r}")
  if not alpha >= 0:
    raise ValueError(f"mmd: alpha must be >= 0 (0: naive policy gradient), got {alpha}")
  if estimator not in ESTIMATORS:
    raise ValueError(f"mmd: estimator={estimator!r}; expected one of {ESTIMATORS}")
  check_baseline(baseline, "mmd")

  def seat_value(s, play, logp_BTV, legal_BTV, magnet_logp):
    moves = play.moves
    mask_BT = records.next_token_weights(moves, (s,))
    rows = mask_BT.shape[0]
    rewards_B = read_judgment(play, records.seat_key(s, "rewards"), (rows,), "mmd",
                              f"the {s}'s reward of each game")
    if estimator == "sampled":
      logp_BT = jnp.take_along_axis(logp_BTV, records.next_tokens(moves)[..., None], -1)[..., 0]
      advantages_B = rewards_B - seat_baseline(baseline, s, rewards_B, play, "mmd",
                                               role_baselines)
      terms_B = advantages_B * (jnp.where(mask_BT > 0, logp_BT, 0.0)).sum(-1)
    else:
      values_BV = read_judgment(play, records.seat_key(s, "action_values"),
                                (rows, logp_BTV.shape[-1]), "mmd",
                                f"the value of each move at the {s}'s decision")
      p_BV = (jnp.exp(logp_BTV) * mask_BT[..., None]).sum(1)     # the one decision of each row
      terms_B = (p_BV * values_BV).sum(-1)
    kl_BT = kl_to_magnet(logp_BTV, magnet_logp, legal_BTV) * mask_BT
    policy_term = terms_B.mean()
    kl = kl_BT.sum() / rows
    value = policy_term - alpha * kl
    entropy_BT = -jnp.where(legal_BTV, jnp.exp(logp_BTV) * logp_BTV, 0.0).sum(-1)
    decisions = jnp.maximum(mask_BT.sum(), 1.0)
    return value, {"payoff": value, "policy_term": policy_term,
                   "kl": jax.lax.stop_gradient(kl),
                   "entropy": jax.lax.stop_gradient((entropy_BT * mask_BT).sum() / decisions),
                   "reward_mean": rewards_B.mean(),
                   "nonfinite_rewards": (~jnp.isfinite(rewards_B)).sum()}

  def payoff(params: Any, play: Play):
    chex.assert_rank(play.moves.tokens, 2)
    logits_BTV = moves_logits(play.apply, params, play.moves)
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    legal_BTV = logits_BTV > LEGAL
    magnet_logp = None
    if magnet is not None:
      magnet_logp = jax.nn.log_softmax(
          moves_logits(play.apply, frozen_player(play, magnet, "mmd's magnet"), play.moves),
          axis=-1)
    total, metrics = 0.0, {}
    for s in seats:
      value, m = seat_value(s, play, logp_BTV, legal_BTV, magnet_logp)
      total = total + value
      if len(seats) == 1:
        m.pop("payoff")
        metrics.update(m)
      else:
        metrics.update({f"{s}/{k}": v for k, v in m.items()})
    metrics["loss"] = -total
    return total, metrics

  payoff.frozen_players = tuple(   # the frozen players it reads: the run checks the stage has them
      n for n in (magnet, role_baselines if baseline == "role" else None) if n is not None)
  return payoff
