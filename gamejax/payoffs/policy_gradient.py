"""Policy-gradient payoffs from a judge's scalar rewards: REINFORCE, RLOO and GRPO.

The RL play is ``P`` prompts with ``G`` sampled completions each: ``play.moves`` has ``B = P * G``
rows in group-major order (rows ``[g * G, (g + 1) * G)`` answer prompt ``g``), prompt tokens moved
by the opponent, completion tokens by the agent, padding (segment 0) anywhere around them. Each
row holds one completion. Each payoff scores one ``seat`` (``"agent"`` by default; ``"opponent"``
when the opponent learns): the tokens that seat moved, and the judge's constants for it in
``play.judgments``, namespaced by the seat (``records.seat_key``):

* ``"<seat>/rewards"``: ``float32[B]``, one scalar per completion (every payoff here);
* ``"behaviour_logprobs"``: ``float32[B, T]``, the sampling policy's log-prob of token ``t+1`` at
  index ``t`` (GRPO's importance ratio);
* ``"reference_token_logprobs"``: ``float32[B, T]``, same alignment, the frozen reference
  (GRPO's KL term when ``beta > 0``; ``kl_to_reference``).

Each objective is written once for one sequence or one group and ``vmap``-ped over the batch.
Rewards are not cleaned: a non-finite reward makes the value non-finite (and is counted in the
``nonfinite_rewards`` metric), so the step's non-finite guard skips that update.

>>> import jax, jax.numpy as jnp, numpy as np
>>> from gamejax import records
>>> from gamejax.payoffs import Play
>>> O, A = records.OPPONENT, records.AGENT
>>> moves = records.from_transcripts([(np.array([3, 4, 5, 6]), np.array([O, O, A, A])),
...                                   (np.array([3, 4, 7]), np.array([O, O, A]))], seq_len=4)
>>> apply = lambda params, tokens, positions, segment_ids: params[tokens]  # a bigram "model"
>>> play = Play(apply, jax.tree.map(jnp.asarray, moves),
...             {"agent/rewards": jnp.array([1.0, 0.0])}, jax.random.PRNGKey(0))
>>> value, metrics = rloo(group_size=2)(jnp.zeros((8, 8)), play)  # (2 - 1) log(1/8) / 2
>>> round(float(value), 4), float(metrics["advantage_abs_mean"])
(-1.0397, 1.0)
>>> on_policy = jnp.where(records.next_token_weights(play.moves, ("agent",)) > 0, -jnp.log(8.), 0.)
>>> play = play._replace(judgments={**play.judgments, "behaviour_logprobs": on_policy})
>>> value, metrics = grpo(group_size=2, beta=0.0)(jnp.zeros((8, 8)), play)
>>> float(metrics["ratio_mean"]), float(metrics["clip_fraction"])
(1.0, 0.0)
"""
from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp

from gamejax.payoffs.base import Payoff, Play
from gamejax import records
from gamejax.payoffs.kl import (REFERENCE_TOKEN_LOGPROBS, kl_estimate, read_judgment,
                                seat_token_logprobs)

REWARDS = "rewards"
BEHAVIOUR_LOGPROBS = "behaviour_logprobs"
BASELINES = ("batch_mean", "none", "role")
ROLE_BASELINES = "roles"      # where the step keeps the role baselines (Stage.followers)
LOSS_AGGREGATIONS = ("sequence", "token", "constant")


# ---- advantages of one group ---------------------------------------------------------------------

def rloo_advantages(rewards_G: jax.Array) -> jax.Array:
  """Leave-one-out advantages ``r_i - mean_{j != i} r_j`` (equal to ``G/(G-1) (r_i - mean r)``)."""
  chex.assert_rank(rewards_G, 1)
  g = rewards_G.shape[0]
  return rewards_G - (rewards_G.sum() - rewards_G) / (g - 1)


def grpo_advantages(rewards_G: jax.Array, scale_rewards: bool = True,
                    eps: float = 1e-4) -> jax.Array:
  """``(r_i - mean r) / (std r + eps)`` with the sample std (ddof=1); unscaled if not ``scale``."""
  chex.assert_rank(rewards_G, 1)
  centred_G = rewards_G - rewards_G.mean()
  if not scale_rewards:
    return centred_G
  return centred_G / (jnp.std(rewards_G, ddof=1) + eps)


# ---- objectives of one sequence ------------------------------------------------------------------

def _score_function_term(logp_T: jax.Array, mask_T: jax.Array, advantage: jax.Array) -> jax.Array:
  """``A * sum_t log pi(token t+1)`` over one sequence's agent tokens, ``A`` held constant."""
  chex.assert_rank([logp_T, mask_T, advantage], [1, 1, 0])
  return jax.lax.stop_gradient(advantage) * (logp_T * mask_T).sum()


def _grpo_tokens(logp_T, behaviour_T, ref_T, mask_T, advantage, *, clip_eps, beta):
  """One completion's per-token GRPO objective (0 off the agent's tokens) and diagnostics.

  ``min(rho A, clip(rho, 1 - clip_eps, 1 + clip_eps) A) - beta * k3`` with
  ``rho = exp(logp - behaviour_logp)``; behaviour and reference log-probs are constants.
  """
  chex.assert_rank([logp_T, behaviour_T, ref_T, mask_T, advantage], [1, 1, 1, 1, 0])
  on_T = mask_T > 0
  behaviour_T = jnp.where(on_T, jax.lax.stop_gradient(behaviour_T), 0.0)
  advantage = jax.lax.stop_gradient(advantage)
  ratio_T = jnp.exp(logp_T - behaviour_T)
  clipped_ratio_T = jnp.clip(ratio_T, 1.0 - clip_eps, 1.0 + clip_eps)
  objective_T = jnp.minimum(ratio_T * advantage, clipped_ratio_T * advantage)
  if beta:
    ref_T = jnp.where(on_T, jax.lax.stop_gradient(ref_T), 0.0)
    kl_T = kl_estimate(logp_T, ref_T, "k3")
    objective_T = objective_T - beta * kl_T
  else:
    kl_T = jnp.zeros_like(logp_T)
  # Tokens whose gradient the clip removes (the ratio left the trust region on the side A favours).
  clipped_T = (((ratio_T < 1.0 - clip_eps) & (advantage < 0))
               | ((ratio_T > 1.0 + clip_eps) & (advantage > 0)))
  return objective_T * mask_T, {"ratio": ratio_T, "kl": kl_T,
                                "clipped": clipped_T.astype(jnp.float32)}


def _grpo_group(logp_GT, behaviour_GT, ref_GT, mask_GT, rewards_G, *, scale_rewards, eps,
                clip_eps, beta):
  """The per-token objectives of one group of ``G`` completions of the same prompt."""
  chex.assert_rank([logp_GT, behaviour_GT, ref_GT, mask_GT, rewards_G], [2, 2, 2, 2, 1])
  advantages_G = grpo_advantages(rewards_G, scale_rewards, eps)
  tokens = functools.partial(_grpo_tokens, clip_eps=clip_eps, beta=beta)
  objective_GT, diagnostics = jax.vmap(tokens)(logp_GT, behaviour_GT, ref_GT, mask_GT,
                                               advantages_G)
  return objective_GT, advantages_G, diagnostics


# ---- helpers shared by the payoffs ---------------------------------------------------------------

def _check_group_size(group_size: int, name: str) -> None:
  if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
    raise ValueError(f"{name}: group_size must be an int >= 2 (completions per prompt), got "
                     f"{group_size!r}")


def _groups(x: jax.Array, group_size: int, name: str) -> jax.Array:
  """``[B, ...] -> [P, G, ...]`` for a group-major batch."""
  if x.shape[0] % group_size:
    raise ValueError(f"{name}: the batch has {x.shape[0]} rows, not a multiple of group_size="
                     f"{group_size} (rows [g*G, (g+1)*G) are the G completions of prompt g)")
  return x.reshape((x.shape[0] // group_size, group_size) + x.shape[1:])


def _rewards(play: Play, rows: int, name: str, seat: str) -> jax.Array:
  return read_judgment(play, records.seat_key(seat, REWARDS), (rows,), name,
                       f"the judge's reward of each of the {seat}'s completions")


def check_baseline(baseline: str, name: str) -> None:
  if baseline not in BASELINES:
    raise ValueError(f"{name}: unknown baseline {baseline!r}; expected one of {BASELINES}")


def seat_baseline(baseline: str, seat: str, rewards_B: jax.Array, play: Play, name: str,
                  role_baselines: str = ROLE_BASELINES) -> jax.Array:
  """The constant ``b`` subtracted from ``seat``'s rewards: the batch mean (``"batch_mean"``), 0
  (``"none"``), or (``"role"``) the seat's role baseline, kept by the step in
  ``play.frozen[role_baselines]`` (``players.selfplay.role_baselines``: an EMA of the seat's
  rewards over past steps)."""
  if baseline == "batch_mean":
    return rewards_B.mean()
  if baseline == "none":
    return jnp.zeros((), rewards_B.dtype)
  if role_baselines not in play.frozen:
    raise KeyError(f"{name}: baseline='role' reads role baselines {role_baselines!r}, which the "
                   f"step does not keep; the frozen players are {sorted(play.frozen)} (add "
                   f"Stage.followers={{{role_baselines!r}: role_baselines()}})")
  return jax.lax.stop_gradient(play.frozen[role_baselines][seat]).astype(rewards_B.dtype)


def _reward_metrics(rewards_B, advantages_B, mask_BT):
  return {"reward_mean": rewards_B.mean(), "reward_std": rewards_B.std(),
          "advantage_abs_mean": jnp.abs(advantages_B).mean(),
          "completion_length": mask_BT.sum(axis=-1).mean(),
          "nonfinite_rewards": (~jnp.isfinite(rewards_B)).sum()}


# ---- the payoffs ---------------------------------------------------------------------------------

def reinforce(baseline: str = "batch_mean", seat: str = "agent",
              role_baselines: str = ROLE_BASELINES) -> Payoff:
  """REINFORCE (Williams 1992): ``mean_i (r_i - b) * log pi(completion_i)``, ``b`` constant.

  ``baseline="batch_mean"``: ``b`` is the batch's mean reward; ``"none"``: ``b = 0``;
  ``"role"``: the seat's role baseline, an EMA of its rewards kept by the step under the name
  ``role_baselines`` (``players.selfplay.role_baselines``; SPIRAL's role-conditioned
  advantages). Reads ``judgments["<seat>/rewards"]``.
  """
  records.seat_key(seat, REWARDS)
  check_baseline(baseline, "reinforce")
  batched_term = jax.vmap(_score_function_term)

  def payoff(params: Any, play: Play):
    logp_BT, mask_BT = seat_token_logprobs(params, play, seat)
    rewards_B = _rewards(play, logp_BT.shape[0], "reinforce", seat)
    advantages_B = rewards_B - seat_baseline(baseline, seat, rewards_B, play, "reinforce",
                                             role_baselines)
    value = batched_term(logp_BT, mask_BT, advantages_B).mean()
    return value, {"loss": -value, **_reward_metrics(rewards_B, advantages_B, mask_BT)}

  if baseline == "role":
    payoff.frozen_players = (role_baselines,)      # the run checks the stage keeps them
  return payoff


def _rloo_group(logp_GT, mask_GT, rewards_G):
  """One group's mean of ``A_i * log pi(completion_i)`` with leave-one-out ``A_i``."""
  chex.assert_rank([logp_GT, mask_GT, rewards_G], [2, 2, 1])
  advantages_G = rloo_advantages(rewards_G)
  return jax.vmap(_score_function_term)(logp_GT, mask_GT, advantages_G).mean(), advantages_G


def rloo(group_size: int, seat: str = "agent") -> Payoff:
  """REINFORCE leave-one-out (Ahmadian et al. 2024): ``A_i = r_i - mean_{j != i} r_j`` per group.

  Value ``mean_i A_i * log pi(completion_i)``. Reads ``judgments["<seat>/rewards"]``.
  """
  _check_group_size(group_size, "rloo")
  records.seat_key(seat, REWARDS)
  batched_group = jax.vmap(_rloo_group)

  def payoff(params: Any, play: Play):
    logp_BT, mask_BT = seat_token_logprobs(params, play, seat)
    rows = logp_BT.shape[0]
    rewards_B = _rewards(play, rows, "rloo", seat)
    values_P, advantages_PG = batched_group(_groups(logp_BT, group_size, "rloo"),
                                            _groups(mask_BT, group_size, "rloo"),
                                            _groups(rewards_B, group_size, "rloo"))
    value = values_P.mean()
    metrics = _reward_metrics(rewards_B, advantages_PG.reshape(rows), mask_BT)
    return value, {"loss": -value, **metrics}

  payoff.group_size = group_size    # the run checks it against the rollout's group size
  return payoff


def grpo(group_size: int, clip_eps: float = 0.2, beta: float = 0.04, scale_rewards: bool = True,
         loss_aggregation: str = "sequence", max_completion_tokens: int | None = None,
         eps: float = 1e-4, seat: str = "agent") -> Payoff:
  """Group Relative Policy Optimisation (Shao et al. 2024) and its Dr. GRPO / DAPO variants.

  Per group: ``A_i = (r_i - mean r) / (std r + eps)`` with the *sample* std (ddof=1, as TRL and
  OpenRLHF compute it), or ``r_i - mean r`` when ``scale_rewards=False`` (Dr. GRPO, Liu et al.
  2025). Per agent token: ``min(rho A, clip(rho, 1 +- clip_eps) A) - beta * k3`` with
  ``rho = exp(logp - behaviour_logp)`` and ``k3 = exp(ref - logp) - (ref - logp) - 1``.
  ``loss_aggregation``:

  * ``"sequence"``: mean over each completion's tokens, then over completions (GRPO);
  * ``"token"``: sum over all the batch's agent tokens / their number (DAPO, Yu et al. 2025);
  * ``"constant"``: each completion's sum / ``max_completion_tokens``, mean over completions
    (Dr. GRPO; ``max_completion_tokens`` is the sampler's completion budget).

  A completion with no tokens of ``seat`` contributes 0 (its token count is clamped to 1). Reads
  ``judgments["<seat>/rewards"]``, ``["behaviour_logprobs"]`` and, when ``beta > 0``,
  ``["reference_token_logprobs"]``.
  """
  _check_group_size(group_size, "grpo")
  records.seat_key(seat, REWARDS)
  if not clip_eps > 0:
    raise ValueError(f"grpo: clip_eps must be > 0, got {clip_eps}")
  if not beta >= 0:
    raise ValueError(f"grpo: beta must be >= 0 (0 drops the reference KL), got {beta}")
  if not eps >= 0:
    raise ValueError(f"grpo: eps must be >= 0, got {eps}")
  if loss_aggregation not in LOSS_AGGREGATIONS:
    raise ValueError(f"grpo: unknown loss_aggregation {loss_aggregation!r}; expected one of "
                     f"{LOSS_AGGREGATIONS}")
  if loss_aggregation == "constant" and (
      isinstance(max_completion_tokens, bool) or not isinstance(max_completion_tokens, int)
      or max_completion_tokens < 1):
    raise ValueError("grpo: loss_aggregation='constant' needs max_completion_tokens, a positive "
                     f"int (the completion budget); got {max_completion_tokens!r}")
  batched_group = jax.vmap(functools.partial(_grpo_group, scale_rewards=scale_rewards, eps=eps,
                                             clip_eps=clip_eps, beta=beta))

  def payoff(params: Any, play: Play):
    logp_BT, mask_BT = seat_token_logprobs(params, play, seat)
    rows = logp_BT.shape[0]
    rewards_B = _rewards(play, rows, "grpo", seat)
    behaviour_BT = read_judgment(play, BEHAVIOUR_LOGPROBS, logp_BT.shape, "grpo",
                                 "the sampling policy's log-prob of each next token")
    if beta:
      ref_BT = read_judgment(play, REFERENCE_TOKEN_LOGPROBS, logp_BT.shape, "grpo",
                             "the frozen reference's log-prob of each next token; or beta=0")
    else:
      ref_BT = jnp.zeros_like(logp_BT)
    groups = functools.partial(_groups, group_size=group_size, name="grpo")
    objective_PGT, advantages_PG, diagnostics = batched_group(
        groups(logp_BT), groups(behaviour_BT), groups(ref_BT), groups(mask_BT), groups(rewards_B))
    objective_BT = objective_PGT.reshape(logp_BT.shape)
    lengths_B = mask_BT.sum(axis=-1)
    tokens = lengths_B.sum()
    if loss_aggregation == "sequence":
      value = (objective_BT.sum(axis=-1) / jnp.maximum(lengths_B, 1.0)).mean()
    elif loss_aggregation == "token":
      value = objective_BT.sum() / jnp.maximum(tokens, 1.0)
    else:
      value = (objective_BT.sum(axis=-1) / max_completion_tokens).mean()

    def token_mean(x_PGT):
      return (x_PGT.reshape(logp_BT.shape) * mask_BT).sum() / jnp.maximum(tokens, 1.0)

    metrics = {"loss": -value,
               **_reward_metrics(rewards_B, advantages_PG.reshape(rows), mask_BT),
               "clip_fraction": token_mean(diagnostics["clipped"]),
               "ratio_mean": token_mean(diagnostics["ratio"])}
    if beta:
      metrics["kl"] = token_mean(diagnostics["kl"])
    return value, metrics

  payoff.group_size = group_size    # the run checks it against the rollout's group size
  return payoff
