"""The registries assembly reads instead of string ``if``s: learner models and judges by name.

A learner model (``Player.model``, the inline ``Stage.player``) is a ``ModelKind``: how its params
start (fresh, or from another stage's params), its pure ``apply``, the policy inside its params
(what samples moves and what the next stage inherits), and whether its logits follow the
sampler's temperature. A judge (``Rollout.judge``) is a name mapped to a responder builder.
Register your own with ``MODELS[name] = ModelKind(...)`` / ``JUDGES[name] = ...`` before a run.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

from gamejax.models import lm, policy_value, reward
from gamejax.players import judges


@dataclasses.dataclass(frozen=True)
class ModelKind:
  # init(cfg, rng, params_from_elsewhere or None) -> params
  init: Callable[[lm.Config, Any, Any], Any]
  # apply(cfg) -> apply(params, tokens, positions, segment_ids)
  apply: Callable[[lm.Config], Callable[..., Any]]
  # The policy params inside the params (what samples, and what another stage starts from).
  policy: Callable[[Any], Any] = lambda params: params
  samples: bool = True           # its logits are a policy's (scaled by the scoring temperature)


def _policy_init(cfg, rng, init):
  return policy_value.policy_params(init) if init is not None else lm.init_params(cfg, rng)


def _policy_value_init(cfg, rng, init):
  init = None if init is None else policy_value.policy_params(init)
  return policy_value.init_params(cfg, rng, init)


def _reward_model_init(cfg, rng, init):
  if init is not None and "head" in init:          # already a reward model
    return init
  params = reward.init_params(cfg, rng)
  if init is not None:
    init = policy_value.policy_params(init)
    params["trunk"] = {k: v for k, v in init.items() if k != "lm_head"}
  return params


MODELS: dict[str, ModelKind] = {
    "policy": ModelKind(_policy_init, lm.bind),
    "policy_value": ModelKind(_policy_value_init,
                              policy_value.bind,
                              policy=policy_value.policy_params),
    "reward_model": ModelKind(_reward_model_init, lambda cfg: functools.partial(reward.apply, cfg),
                              samples=False),
}

# Rollout.judge names -> a builder of the responder from the model config.
JUDGES: dict[str, Callable[[lm.Config], judges.Responder]] = {
    "arena": lambda cfg: judges.arena_judge(),
    "reward_model": lambda cfg: judges.reward_model_judge(cfg, functools.partial(reward.apply,
                                                                                 cfg)),
}
