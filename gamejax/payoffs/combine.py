"""Combinators: payoffs compose like ``optax.chain``.

``weighted({"sft": (1.0, imitation(("agent",))), "lm": (0.1, imitation(("opponent",)))})`` is a
payoff whose value is the weighted sum of its parts and whose metrics are each part's metrics under
the part's name (``sft/loss``, ``lm/loss``, ...), plus each part's value (``sft/payoff``).

A payoff may carry static attributes the run reads (``PROPAGATED``): ``group_size`` (it compares
groups of completions of one prompt: the run checks it against the rollout and refuses
minibatches that would split the groups), ``players`` (whose moves it imitates: held-out loss is
measured on those) and ``frozen_players`` (the frozen players it reads, e.g. MMD's magnet: the run
checks the stage has them). Combinators carry their parts' attributes, however deeply they nest.
"""
from __future__ import annotations

from typing import Mapping

import jax

from gamejax.payoffs.base import Payoff, Play


def weighted(parts: Mapping[str, tuple[float, Payoff]]) -> Payoff:
  """The weighted sum of named payoffs; every part sees the same play with its own folded key."""
  if not parts:
    raise ValueError("weighted() needs at least one named payoff")
  items = sorted(parts.items())

  def payoff(params, play: Play):
    total, metrics = 0.0, {}
    for i, (name, (weight, part)) in enumerate(items):
      value, part_metrics = part(params, play._replace(rng=jax.random.fold_in(play.rng, i)))
      total = total + weight * value
      metrics[f"{name}/payoff"] = value
      metrics.update({f"{name}/{k}": v for k, v in part_metrics.items()})
    metrics["loss"] = -total
    return total, metrics

  groups = {getattr(part, "group_size") for _, part in parts.values() if hasattr(part, "group_size")}
  if len(groups) > 1:
    raise ValueError(f"weighted() parts group completions differently: group sizes {sorted(groups)}")
  if groups:
    payoff.group_size = groups.pop()     # the run checks it against the rollout's group size
  for name in ("players", "frozen_players"):
    found = [getattr(part, name) for _, part in parts.values() if hasattr(part, name)]
    if found:
      setattr(payoff, name, tuple(sorted(set().union(*found))))
  return payoff


PROPAGATED = ("group_size", "players", "frozen_players")


def scaled(weight: float, part: Payoff) -> Payoff:
  """``weight`` times a payoff, metrics and attributes (``PROPAGATED``) unchanged."""
  def payoff(params, play: Play):
    value, metrics = part(params, play)
    return weight * value, metrics
  for name in PROPAGATED:
    if hasattr(part, name):
      setattr(payoff, name, getattr(part, name))
  return payoff
