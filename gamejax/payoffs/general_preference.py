"""General-preference games: a judge says how likely one answer is preferred to another,
``P(y > y' | x)``, with no reward behind it (preferences may be intransitive), and the solution
is the game's Nash equilibrium, not a reward maximiser.

The play is ``P`` prompts with ``G`` sampled answers each (group-major rows, as for GRPO). A
pairwise judge (``gamejax.players.judges.pairwise_judge``) fills, per seat,
``"<seat>/win_rates"``: ``float32[B]``, the estimate ``P(y_i > pi_t | x) = mean_{j != i}
P(y_i > y_j | x)`` against the group's other answers (the sampling policy ``pi_t``).

``sppo(eta)`` is Self-Play Preference Optimisation (Wu et al. 2024, eq. 3.6):

    minimise  mean_i ( log pi(y_i|x) / pi_t(y_i|x) - eta * (P(y_i > pi_t | x) - 1/2) )^2

with ``pi_t`` the previous iterate's log-probs (``"reference_token_logprobs"``: a frozen copy,
refreshed each iteration by a ``lagged`` follower, or the stage's initial params).

>>> import numpy as np
>>> np.round(np.asarray(group_win_rates(jnp.asarray([[.5, 1., 0.], [0., .5, .5], [1., .5, .5]]))), 3).tolist()
[0.5, 0.25, 0.75]
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from gamejax import records
from gamejax.payoffs.base import Payoff, Play
from gamejax.payoffs.kl import (REFERENCE_TOKEN_LOGPROBS, read_judgment,
                                seat_token_logprobs)

WIN_RATES = "win_rates"


def group_win_rates(prefs_GG: jax.Array) -> jax.Array:
  """``float32[G]``: each answer's mean preference over the group's other answers,
  ``mean_{j != i} P[i, j]`` (the diagonal, an answer against itself, is left out)."""
  chex.assert_rank(prefs_GG, 2)
  g = prefs_GG.shape[0]
  off_GG = 1.0 - jnp.eye(g, dtype=prefs_GG.dtype)
  return (prefs_GG * off_GG).sum(axis=1) / (g - 1)


def sppo_loss(logratio_B: jax.Array, win_rates_B: jax.Array, eta: float) -> jax.Array:
  """SPPO's squared loss, averaged over answers: ``mean (logratio - eta (win - 1/2))^2``."""
  chex.assert_rank([logratio_B, win_rates_B], 1)
  return jnp.mean((logratio_B - eta * (win_rates_B - 0.5)) ** 2)


def sppo(eta: float = 1.0, group_size: int | None = None, seat: str = "agent") -> Payoff:
  """Self-Play Preference Optimisation (Wu et al. 2024) as a payoff: minus ``sppo_loss`` of the
  tokens ``seat`` moved, its win rates from a pairwise judge (``"<seat>/win_rates"``) and
  ``pi_t`` from ``"reference_token_logprobs"``.

  ``group_size``: the answers per prompt the win rates were estimated over (checked against the
  rollout at config time, like GRPO's). Metrics: ``loss``, ``logratio_mean``, ``win_rate_mean``,
  ``target_mean`` (mean ``eta (win - 1/2)``)."""
  if not eta > 0:
    raise ValueError(f"sppo: eta must be > 0, got {eta}")
  if group_size is not None and group_size < 2:
    raise ValueError(f"sppo: group_size must be >= 2 (win rates against the others), got "
                     f"{group_size}")
  win_key = records.seat_key(seat, WIN_RATES)

  def payoff(params, play: Play):
    b, t = play.moves.shape
    logp_BT, mask_BT = seat_token_logprobs(params, play, seat)
    ref_BT = read_judgment(play, REFERENCE_TOKEN_LOGPROBS, (b, t), "sppo",
                           "the previous iterate's per-token log-probs")
    win_B = read_judgment(play, win_key, (b,), "sppo", "each answer's win rate in its group")
    logratio_B = ((logp_BT - ref_BT) * mask_BT).sum(axis=1)
    loss = sppo_loss(logratio_B, win_B, eta)
    metrics = {"loss": loss, "logratio_mean": logratio_B.mean(), "win_rate_mean": win_B.mean(),
               "target_mean": (eta * (win_B - 0.5)).mean()}
    return -loss, metrics

  payoff.group_size = group_size
  return payoff
