"""PPO with a learned critic: GAE advantages and the clipped policy + value payoff.

The PPO learner is an actor-critic: its ``apply(params, tokens, positions, segment_ids)`` returns
``(logits_BTV, values_BT)``, where ``values_BT[t]`` is the value of the state after reading tokens
``<= t`` (the position that predicts token ``t+1``, the alignment of the agent-token mask
``records.next_token_weights(moves, ("agent",))``). One rollout is trained in two stages:

1. ``prepare = ppo_prepare(gamma, lam, kl_coef, whiten)`` runs once per rollout on the params that
   sampled it: the sequence reward (``judgments["agent/rewards"]``) is placed on each completion's last
   agent token, minus ``kl_coef * (behaviour - reference)`` on every agent token (the per-token KL
   penalty of Ziegler et al. 2019 / InstructGPT), and GAE (Schulman et al. 2016) over the agent's
   token positions gives ``{"agent/advantages", "agent/returns", "agent/old_values"}``, all
   ``float32[B, T]`` and zero off the agent's tokens;
2. ``ppo(clip_eps, value_clip_eps, value_coef, entropy_coef)`` is the payoff of the minibatch
   epochs: it reads those three keys plus ``"behaviour_logprobs"`` from ``play.judgments``.

The payoff is the mean over the batch's agent tokens of
``min(rho A, clip(rho, 1 +- clip_eps) A) - value_coef * 0.5 * max((V - R)^2,
(clip(V, V_old +- value_clip_eps) - R)^2) + entropy_coef * H`` with ``rho = exp(logp -
behaviour_logp)`` (Schulman et al. 2017; the value clipping of OpenAI baselines and InstructGPT).
All three take ``seat`` (default ``"agent"``): the opponent's seat learns by PPO with
``seat="opponent"``, reading and writing ``"opponent/..."`` keys.

>>> import jax, jax.numpy as jnp, numpy as np
>>> from gamejax import records
>>> from gamejax.payoffs import Play
>>> O, A = records.OPPONENT, records.AGENT
>>> moves = records.from_transcripts([(np.array([3, 4, 5, 6]), np.array([O, O, A, A]))], seq_len=5)
>>> moves = jax.tree.map(jnp.asarray, moves)
>>> def apply(params, tokens, positions, segment_ids):  # bigram logits, a value per token
...   return params["logits"][tokens], params["values"][tokens]
>>> params = {"logits": jnp.zeros((8, 8)), "values": jnp.zeros(8)}
>>> logp = jnp.where(records.next_token_weights(moves, ("agent",)) > 0, -jnp.log(8.0), 0.0)
>>> play = Play(apply, moves, {"agent/rewards": jnp.array([1.0]), "behaviour_logprobs": logp},
...             jax.random.PRNGKey(0))
>>> prepared = ppo_prepare(gamma=1.0, lam=1.0, whiten=False)(params, play)
>>> prepared["agent/advantages"].tolist()  # the reward, from both agent tokens' positions
[[0.0, 1.0, 1.0, 0.0, 0.0]]
>>> play = play._replace(judgments={**play.judgments, **prepared})
>>> value, metrics = ppo(value_coef=0.5)(params, play)  # 1 - 0.5 * 0.5 * (0 - 1)^2
>>> float(value), float(metrics["clip_fraction"]), float(metrics["approx_kl"])
(0.75, 0.0, 0.0)
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp

from gamejax import records
from gamejax.models import logprobs
from gamejax.payoffs import base
from gamejax.payoffs.base import Payoff, Play
from gamejax.payoffs.kl import REFERENCE_TOKEN_LOGPROBS, kl_estimate, read_judgment

REWARDS = "rewards"
BEHAVIOUR_LOGPROBS = "behaviour_logprobs"
ADVANTAGES = "advantages"
RETURNS = "returns"
OLD_VALUES = "old_values"
WHITEN_EPS = 1e-8


# ---- one sequence --------------------------------------------------------------------------------

def gae(rewards_T: jax.Array, values_T: jax.Array, mask_T: jax.Array, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation (Schulman et al. 2016) over one sequence's masked steps.

  The trajectory is the positions with ``mask_T > 0``, in order; the others are skipped (the next
  step's value and advantage are carried across them). The value after the last step is 0
  (terminal). ``delta_t = r_t + gamma V_next - V_t``, ``A_t = delta_t + gamma lam A_next``,
  returns ``A + V``; both zero off the mask.

  >>> a, r = gae(jnp.array([0.0, 1.0, 9.0, 2.0]), jnp.array([0.5, 1.0, 9.0, 0.0]),
  ...            jnp.array([1.0, 1.0, 0.0, 1.0]), gamma=1.0, lam=1.0)
  >>> a.tolist(), r.tolist()  # the step at index 2 is not in the trajectory
  ([2.5, 2.0, 0.0, 2.0], [3.0, 3.0, 0.0, 2.0])
  """
  chex.assert_rank([rewards_T, values_T, mask_T], 1)
  chex.assert_equal_shape([rewards_T, values_T, mask_T])
  on_T = mask_T > 0
  rewards_T = jnp.where(on_T, rewards_T.astype(jnp.float32), 0.0)
  values_T = jnp.where(on_T, values_T.astype(jnp.float32), 0.0)

  def step(carry, x):
    next_value, next_advantage = carry
    reward, value, on = x
    delta = reward + gamma * next_value - value
    advantage = delta + gamma * lam * next_advantage
    carry = (jnp.where(on, value, next_value), jnp.where(on, advantage, next_advantage))
    return carry, jnp.where(on, advantage, 0.0)

  zero = jnp.zeros((), jnp.float32)
  _, advantages_T = jax.lax.scan(step, (zero, zero), (rewards_T, values_T, on_T), reverse=True)
  return advantages_T, jnp.where(on_T, advantages_T + values_T, 0.0)


def _token_rewards(reward: jax.Array, mask_T: jax.Array, kl_T: jax.Array,
                   kl_coef: float) -> jax.Array:
  """One sequence: ``reward`` on its last masked position, ``- kl_coef * kl`` on every one."""
  chex.assert_rank([reward, mask_T, kl_T], [0, 1, 1])
  on_T = mask_T > 0
  t = mask_T.shape[0]
  last = t - 1 - jnp.argmax(on_T[::-1])          # T - 1 (and off the mask) when there is none
  last_T = on_T & (jnp.arange(t) == last)
  penalty_T = jnp.where(on_T, kl_coef * kl_T.astype(jnp.float32), 0.0)
  return jnp.where(last_T, reward.astype(jnp.float32), 0.0) - penalty_T


def token_rewards(rewards_B: jax.Array, mask_BT: jax.Array, kl_BT: jax.Array | None = None,
                  kl_coef: float = 0.0) -> jax.Array:
  """``float32[B, T]``: each row's sequence reward on its last agent position, minus
  ``kl_coef * kl_BT`` on every agent position (``kl_BT``: ``behaviour - reference`` log-probs, the
  k1 estimate; a constant). A row without agent tokens gets all zeros.

  >>> token_rewards(jnp.array([2.0]), jnp.array([[0.0, 1.0, 1.0, 0.0]]), jnp.ones((1, 4)), 0.1)
  Array([[ 0. , -0.1,  1.9,  0. ]], dtype=float32)
  """
  chex.assert_rank([rewards_B, mask_BT], [1, 2])
  if kl_BT is None:
    kl_BT = jnp.zeros(mask_BT.shape, jnp.float32)
  chex.assert_equal_shape([mask_BT, kl_BT])
  per_row = jax.vmap(functools.partial(_token_rewards, kl_coef=kl_coef))
  return per_row(jax.lax.stop_gradient(rewards_B), mask_BT, jax.lax.stop_gradient(kl_BT))


def _masked_mean(x, mask):
  return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def _masked_whiten(x_BT, mask_BT):
  """``(x - mean) / sqrt(var + 1e-8)`` with the mean and (population) variance over the mask."""
  mean = _masked_mean(x_BT, mask_BT)
  var = _masked_mean(jnp.square(x_BT - mean), mask_BT)
  return jnp.where(mask_BT > 0, (x_BT - mean) * jax.lax.rsqrt(var + WHITEN_EPS), 0.0)


def ppo_advantages(values_BT: jax.Array, play: Play, gamma: float = 1.0, lam: float = 0.95,
                   kl_coef: float = 0.0, whiten: bool = True,
                   seat: str = "agent") -> dict[str, jax.Array]:
  """The prepare stage: ``{"<seat>/advantages", "<seat>/returns", "<seat>/old_values"}``
  (``float32[B, T]``, constants, zero off ``seat``'s tokens) from the rollout params'
  ``values_BT``.

  Rewards: ``token_rewards(judgments["<seat>/rewards"], mask, behaviour - reference, kl_coef)``
  (``"behaviour_logprobs"`` and ``"reference_token_logprobs"`` are read only when
  ``kl_coef > 0``). Advantages: per-row ``gae``, then (``whiten``) shifted and scaled to mean 0 and
  variance 1 over the batch's agent tokens; returns are ``A + V`` before whitening. A non-finite
  reward makes every advantage NaN, so that the step skips the update (it is not hidden even on a
  row without agent tokens).
  """
  _check_gae_args(gamma, lam, kl_coef, "ppo_advantages")
  mask_BT = records.next_token_weights(play.moves, (seat,))
  chex.assert_rank([values_BT, mask_BT], 2)
  chex.assert_equal_shape([values_BT, mask_BT])
  values_BT = jax.lax.stop_gradient(values_BT.astype(jnp.float32))
  rows = mask_BT.shape[0]
  rewards_B = read_judgment(play, records.seat_key(seat, REWARDS), (rows,), "ppo_advantages",
                            f"the judge's reward of each of the {seat}'s completions")
  kl_BT = None
  if kl_coef:
    behaviour_BT = read_judgment(play, BEHAVIOUR_LOGPROBS, mask_BT.shape, "ppo_advantages",
                                 "the sampling policy's log-prob of each next token")
    ref_BT = read_judgment(play, REFERENCE_TOKEN_LOGPROBS, mask_BT.shape, "ppo_advantages",
                           "the frozen reference's log-prob of each next token; or kl_coef=0")
    kl_BT = kl_estimate(behaviour_BT, ref_BT, "k1")
  rewards_BT = token_rewards(rewards_B, mask_BT, kl_BT, kl_coef)
  advantages_BT, returns_BT = jax.vmap(functools.partial(gae, gamma=gamma, lam=lam))(
      rewards_BT, values_BT, mask_BT)
  if whiten:
    advantages_BT = _masked_whiten(advantages_BT, mask_BT)
  advantages_BT = jnp.where(jnp.isfinite(rewards_B).all(), advantages_BT, jnp.nan)
  key = functools.partial(records.seat_key, seat)
  return jax.lax.stop_gradient({key(ADVANTAGES): advantages_BT, key(RETURNS): returns_BT,
                                key(OLD_VALUES): jnp.where(mask_BT > 0, values_BT, 0.0)})


def _check_gae_args(gamma, lam, kl_coef, name):
  if not 0.0 <= gamma <= 1.0:
    raise ValueError(f"{name}: gamma must be in [0, 1], got {gamma}")
  if not 0.0 <= lam <= 1.0:
    raise ValueError(f"{name}: lam must be in [0, 1], got {lam}")
  if not kl_coef >= 0:
    raise ValueError(f"{name}: kl_coef must be >= 0 (0 drops the per-token KL penalty), got "
                     f"{kl_coef}")


def _apply_actor_critic(params: Any, play: Play, name: str,
                        scored: bool = False) -> tuple[Any, jax.Array]:
  """``(logits_BTV, values_BT)`` from the learner's ``apply``, checked. ``scored``: ``(Scored,
  values_BT)`` -- the next tokens' log-probs, argmax and entropy, read in blocks by an apply that
  reads targets (``gamejax.models.logprobs``), else scored from its logits."""
  moves = play.moves
  chex.assert_rank(moves.tokens, 2)
  reads = scored and logprobs.reads_targets(play.apply)
  # read at the seat's sampled moves only: the prompts skipped
  options = base.target_options(moves, sampled_only=True) if reads else {}
  out = play.apply(params, moves.tokens, moves.positions, moves.segment_ids, **options)
  if not (isinstance(out, tuple) and len(out) == 2):
    raise TypeError(f"{name}: the PPO learner's apply must return (logits_BTV, values_BT), an "
                    f"actor-critic; got {type(out).__name__}")
  first, values_BT = out
  if reads:
    chex.assert_equal_shape([first.logprobs, values_BT, moves.tokens])
    return first, values_BT
  chex.assert_rank([first, values_BT], [3, 2])
  chex.assert_equal_shape_prefix([first, values_BT, moves.tokens], 2)
  if scored:
    return logprobs.score(first, records.next_tokens(moves)), values_BT
  return first, values_BT


def ppo_prepare(gamma: float = 1.0, lam: float = 0.95, kl_coef: float = 0.0,
                whiten: bool = True,
                seat: str = "agent") -> Callable[[Any, Play], dict[str, jax.Array]]:
  """``prepare(params, play) -> {"<seat>/advantages", ...}``: ``ppo_advantages`` from the
  critic's values under ``params``. Run once per rollout, before the minibatch epochs."""
  _check_gae_args(gamma, lam, kl_coef, "ppo_prepare")
  records.seat_key(seat, ADVANTAGES)

  def prepare(params: Any, play: Play) -> dict[str, jax.Array]:
    _, values_BT = _apply_actor_critic(params, play, "ppo_prepare")
    return ppo_advantages(values_BT, play, gamma=gamma, lam=lam, kl_coef=kl_coef, whiten=whiten,
                          seat=seat)

  return prepare


def _ppo_tokens(logp_T, values_T, behaviour_T, advantages_T, returns_T, old_values_T, mask_T, *,
                clip_eps, value_clip_eps):
  """One sequence's per-token clipped surrogate and (halved) clipped value loss, 0 off the mask."""
  chex.assert_rank([logp_T, values_T, behaviour_T, advantages_T, returns_T, old_values_T, mask_T],
                   1)
  on_T = mask_T > 0
  behaviour_T, advantages_T, returns_T, old_values_T = (
      jnp.where(on_T, jax.lax.stop_gradient(x), 0.0)
      for x in (behaviour_T, advantages_T, returns_T, old_values_T))
  ratio_T = jnp.exp(logp_T - behaviour_T)
  clipped_ratio_T = jnp.clip(ratio_T, 1.0 - clip_eps, 1.0 + clip_eps)
  surrogate_T = jnp.minimum(ratio_T * advantages_T, clipped_ratio_T * advantages_T)
  clipped_T = (((ratio_T < 1.0 - clip_eps) & (advantages_T < 0))
               | ((ratio_T > 1.0 + clip_eps) & (advantages_T > 0)))
  values_T = values_T.astype(jnp.float32)
  value_error_T = jnp.square(values_T - returns_T)
  if value_clip_eps is None:
    value_loss_T, value_clipped_T = 0.5 * value_error_T, jnp.zeros_like(on_T)
  else:
    clipped_values_T = jnp.clip(values_T, old_values_T - value_clip_eps,
                                old_values_T + value_clip_eps)
    clipped_error_T = jnp.square(clipped_values_T - returns_T)
    value_loss_T = 0.5 * jnp.maximum(value_error_T, clipped_error_T)
    value_clipped_T = clipped_error_T > value_error_T
  mask_T = mask_T.astype(jnp.float32)
  return surrogate_T * mask_T, value_loss_T * mask_T, {
      "ratio": ratio_T, "clipped": clipped_T.astype(jnp.float32),
      "value_clipped": value_clipped_T.astype(jnp.float32),
      "approx_kl": kl_estimate(behaviour_T, logp_T, "k3")}   # KL(behaviour || current), k3


def ppo(clip_eps: float = 0.2, value_clip_eps: float | None = 0.2, value_coef: float = 0.5,
        entropy_coef: float = 0.0, seat: str = "agent") -> Payoff:
  """Proximal Policy Optimisation (Schulman et al. 2017) of an actor-critic, one minibatch.

  Value: the mean over the batch's agent tokens of ``min(rho A, clip(rho, 1 +- clip_eps) A)
  - value_coef * 0.5 * max((V - R)^2, (clip(V, V_old +- value_clip_eps) - R)^2)
  + entropy_coef * H`` (``value_clip_eps=None``: the unclipped ``0.5 (V - R)^2``), over the tokens
  ``seat`` moved. Reads ``judgments["<seat>/advantages"]``, ``["<seat>/returns"]``,
  ``["<seat>/old_values"]`` (from ``ppo_prepare(seat=...)``) and ``["behaviour_logprobs"]``; the
  learner's ``apply`` returns ``(logits_BTV, values_BT)``.
  """
  records.seat_key(seat, ADVANTAGES)
  if not clip_eps > 0:
    raise ValueError(f"ppo: clip_eps must be > 0, got {clip_eps}")
  if value_clip_eps is not None and not value_clip_eps > 0:
    raise ValueError(f"ppo: value_clip_eps must be > 0, or None for an unclipped value loss; got "
                     f"{value_clip_eps}")
  if not value_coef >= 0:
    raise ValueError(f"ppo: value_coef must be >= 0, got {value_coef}")
  if not entropy_coef >= 0:
    raise ValueError(f"ppo: entropy_coef must be >= 0, got {entropy_coef}")
  tokens_fn = jax.vmap(functools.partial(_ppo_tokens, clip_eps=clip_eps,
                                         value_clip_eps=value_clip_eps))

  def payoff(params: Any, play: Play):
    scored, values_BT = _apply_actor_critic(params, play, "ppo", scored=True)
    mask_BT = records.next_token_weights(play.moves, (seat,))
    logp_BT = jnp.where(mask_BT > 0, scored.logprobs, 0.0)
    shape = mask_BT.shape
    read = functools.partial(read_judgment, play, shape=shape, payoff_name="ppo")
    behaviour_BT = read(BEHAVIOUR_LOGPROBS,
                        what="the sampling policy's log-prob of each next token")
    prepared = "from ppo_prepare, run once per rollout"
    advantages_BT = read(records.seat_key(seat, ADVANTAGES), what=f"the GAE advantage of each agent token, {prepared}")
    returns_BT = read(records.seat_key(seat, RETURNS), what=f"the critic's target of each agent token, {prepared}")
    old_values_BT = read(records.seat_key(seat, OLD_VALUES), what=f"the rollout critic's values, {prepared}")
    surrogate_BT, value_loss_BT, diagnostics = tokens_fn(
        logp_BT, values_BT, behaviour_BT, advantages_BT, returns_BT, old_values_BT, mask_BT)
    entropy_BT = scored.entropy
    tokens = mask_BT.sum()
    mean = functools.partial(_masked_mean, mask=mask_BT)
    policy_objective, value_loss, entropy = (surrogate_BT.sum() / jnp.maximum(tokens, 1.0),
                                             value_loss_BT.sum() / jnp.maximum(tokens, 1.0),
                                             mean(entropy_BT))
    value = policy_objective - value_coef * value_loss + entropy_coef * entropy
    values_BT = jax.lax.stop_gradient(values_BT.astype(jnp.float32))
    returns_var = mean(jnp.square(returns_BT - mean(returns_BT)))
    residual_BT = returns_BT - values_BT
    residual_var = mean(jnp.square(residual_BT - mean(residual_BT)))
    metrics = {
        "loss": -value, "policy_loss": -policy_objective, "value_loss": value_loss,
        "entropy": jax.lax.stop_gradient(entropy),
        "clip_fraction": mean(diagnostics["clipped"]),
        "value_clip_fraction": mean(diagnostics["value_clipped"]),
        "approx_kl": mean(diagnostics["approx_kl"]), "ratio_mean": mean(diagnostics["ratio"]),
        "advantage_mean": mean(advantages_BT), "return_mean": mean(returns_BT),
        "value_mean": mean(values_BT),
        # 1 - Var(R - V) / Var(R) over the agent tokens, with the current critic (0 if Var(R) = 0).
        "explained_variance": jnp.where(returns_var > 0,
                                        1.0 - residual_var / jnp.maximum(returns_var, 1e-30), 0.0),
        "tokens": tokens}
    return value, metrics

  return payoff
