"""KL to a frozen reference policy, estimated on the agent's sampled tokens (Schulman 2020).

For a token ``x`` sampled from the policy ``pi``, with ``logp = log pi(x)`` and ``ref = log
pi_ref(x)`` (``judgments["reference_token_logprobs"]``, a constant), the per-token estimators of
``KL(pi || pi_ref)`` are

* ``k1 = logp - ref``                          (unbiased, high variance, can be negative);
* ``k2 = 0.5 * (logp - ref)**2``               (biased, low variance, >= 0);
* ``k3 = exp(ref - logp) - (ref - logp) - 1``  (unbiased, low variance, >= 0; the GRPO term).

``kl_to_reference`` is a payoff term: minus the mean estimate over the agent's tokens of the batch.
It composes with a policy-gradient payoff:

>>> from gamejax.payoffs import rloo, weighted
>>> mix = weighted({"rloo": (1.0, rloo(8)), "kl": (0.05, kl_to_reference())})

Used as a loss, the estimators differ in the *gradient* they give on on-policy samples: k2's
expected gradient is that of ``KL(pi || pi_ref)``, k3's is that of ``KL(pi_ref || pi)`` and k1's
is zero (``E_pi[grad log pi] = 0``); their values all estimate ``KL(pi || pi_ref)``.

This module also holds the two readers the RL payoffs share: ``seat_token_logprobs`` (the current
policy's log-probs of one seat's tokens) and ``read_judgment`` (a constant from the judge). Every
RL payoff takes the ``seat`` it scores (``"agent"`` or ``"opponent"``): it reads that seat's tokens
and its namespaced judgments (``"opponent/rewards"``).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp

from gamejax import records
from gamejax.payoffs.base import Payoff, Play, token_logprobs

REFERENCE_TOKEN_LOGPROBS = "reference_token_logprobs"
KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logp: jax.Array, ref: jax.Array, estimator: str = "k3") -> jax.Array:
  """Elementwise per-token estimate of ``KL(pi || pi_ref)`` (see the module docstring)."""
  log_ratio = ref - logp  # log(pi_ref / pi) of the sampled token
  if estimator == "k1":
    return -log_ratio
  if estimator == "k2":
    return 0.5 * jnp.square(log_ratio)
  if estimator == "k3":
    return jnp.expm1(log_ratio) - log_ratio
  raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def seat_token_logprobs(params: Any, play: Play,
                        seat: str = "agent") -> tuple[jax.Array, jax.Array]:
  """``(logp_BT, mask_BT)``: the current policy's log-prob of each token ``seat`` moved, and its
  mask.

  Index ``t`` is ``log pi(token t+1 | tokens <= t)`` where token ``t+1`` was moved by ``seat``
  (``mask_BT == 1``); ``logp_BT`` is 0 elsewhere, so later exponentials cannot overflow there.
  """
  moves = play.moves
  chex.assert_rank(moves.tokens, 2)
  logp_BT = token_logprobs(play.apply, params, moves, sampled_only=True).logprobs
  chex.assert_equal_shape([logp_BT, moves.tokens])
  mask_BT = records.next_token_weights(moves, (seat,))
  return jnp.where(mask_BT > 0, logp_BT, 0.0), mask_BT


def read_judgment(play: Play, key: str, shape: Sequence[int], payoff_name: str,
                  what: str) -> jax.Array:
  """``play.judgments[key]`` as a float32 constant of ``shape`` (a KeyError naming it if absent)."""
  if key not in play.judgments:
    raise KeyError(f"{payoff_name}: play.judgments lacks {key!r} (float32{list(shape)}, {what}); "
                   f"have {sorted(play.judgments)}")
  value = jnp.asarray(play.judgments[key], jnp.float32)
  chex.assert_shape(value, tuple(shape))
  return jax.lax.stop_gradient(value)


def _sequence_kl(logp_T, ref_T, mask_T, estimator):
  """(sum of the per-token KL estimates, number of agent tokens) of one sequence."""
  chex.assert_rank([logp_T, ref_T, mask_T], 1)
  ref_T = jnp.where(mask_T > 0, jax.lax.stop_gradient(ref_T), 0.0)
  return (kl_estimate(logp_T, ref_T, estimator) * mask_T).sum(), mask_T.sum()


def kl_to_reference(estimator: str = "k3", seat: str = "agent") -> Payoff:
  """Minus the mean per-token KL estimate to ``judgments["reference_token_logprobs"]`` over the
  tokens ``seat`` moved."""
  records.seat_key(seat, "")     # an unknown seat fails here, not when traced
  if estimator not in KL_ESTIMATORS:
    raise ValueError(f"kl_to_reference: unknown estimator {estimator!r}; expected one of "
                     f"{KL_ESTIMATORS}")
  sequence_kl = jax.vmap(functools.partial(_sequence_kl, estimator=estimator))

  def payoff(params, play: Play):
    logp_BT, mask_BT = seat_token_logprobs(params, play, seat)
    ref_BT = read_judgment(play, REFERENCE_TOKEN_LOGPROBS, logp_BT.shape, "kl_to_reference",
                           "the frozen reference's log-prob of each next token")
    sums_B, counts_B = sequence_kl(logp_BT, ref_BT, mask_BT)
    tokens = counts_B.sum()
    kl = sums_B.sum() / jnp.maximum(tokens, 1.0)
    return -kl, {"kl": kl, "tokens": tokens}

  return payoff
