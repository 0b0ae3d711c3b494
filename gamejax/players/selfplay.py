"""Frozen players that follow a learner: the opponents of self-play, and MMD's magnet.

A follower is a frozen player (``state.frozen[name]``) made from a learner's params when the stage
starts and kept by the step after every update (``Game.after``):

- ``snapshot(learner)``: the learner's params at the start of the stage, never updated;
- ``lagged(learner, every)``: a copy refreshed every ``every`` steps (the opponent is the learner
  of up to ``every`` steps ago);
- ``ema(learner, decay)``: ``frozen <- decay * frozen + (1 - decay) * params`` after each update
  (an averaged opponent; as MMD's magnet, a slow geometric mixture of past policies when the
  policy is close to linear in its params);
- ``league(learner, size, every)``: the last ``size`` snapshots, one taken every ``every`` steps,
  stacked along a leading axis (``{"params": [size, ...], "count": snapshots taken}``, a ring
  buffer kept in the game state and saved with it); a game samples one member per game
  (``league_members``).

Beside them the step keeps statistics of the play: ``role_baselines(decay)`` holds, per seat, an
EMA of the seat's mean reward (``{"agent": b, "opponent": b}``, updated from the step's judgments
after the update), the role-conditioned baseline of SPIRAL (2025) that a payoff subtracts
(``mmd(baseline="NAME")``, ``reinforce(baseline="NAME")``).

Playing against the learner itself in the same step needs no follower: seat it in both seats.
``mixture(policy, reference, beta)`` seats the geometric mixture ``pi^(1 - beta) rho^beta`` of two
players (Nash-MD's opponent, Munos et al. 2023: the current policy and a frozen reference).

>>> import jax.numpy as jnp
>>> keep = follow({"past": lagged("agent", every=2), "avg": ema("agent", decay=0.5)})
>>> frozen = init_followers({"past": lagged("agent", 2), "avg": ema("agent", 0.5)},
...                         {"agent": jnp.array(0.0)})
>>> for step in (1, 2, 3):
...   frozen = keep.update(frozen, {"agent": jnp.array(float(step))}, jnp.array(step))
>>> float(frozen["past"]), float(frozen["avg"])
(2.0, 2.125)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from gamejax import records

KINDS = ("snapshot", "lagged", "ema", "league")
LEAGUE_PARAMS, LEAGUE_COUNT = "params", "count"


@dataclasses.dataclass(frozen=True)
class Follower:
  """A frozen player made from (and kept up with) the learner ``learner``."""
  learner: str
  kind: str = "snapshot"
  every: int = 0           # lagged, league: refresh / snapshot interval, in steps
  decay: float = 0.0       # ema: weight of the old average
  size: int = 0            # league: members kept

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"follower kind {self.kind!r}; expected one of {KINDS}")
    if self.kind in ("lagged", "league") and not _positive_int(self.every):
      raise ValueError(f"{self.kind}({self.learner!r}, every={self.every!r}): the snapshot "
                       "interval must be an int >= 1 (steps between refreshes)")
    if self.kind == "league" and not _positive_int(self.size):
      raise ValueError(f"league({self.learner!r}, size={self.size!r}): the league size must be an "
                       "int >= 1 (snapshots kept)")
    if self.kind == "ema" and not 0.0 <= self.decay < 1.0:
      raise ValueError(f"ema({self.learner!r}, decay={self.decay!r}): decay must be in [0, 1)")

  def update(self, frozen: Any, params: Any, step: jax.Array) -> Any:
    """The follower after the learner's update number ``step`` (1, 2, ...) gave ``params``."""
    params = jax.lax.stop_gradient(params)
    if self.kind == "snapshot":
      return frozen
    if self.kind == "lagged":
      refresh = (step % self.every) == 0
      return jax.tree.map(lambda f, p: jnp.where(refresh, p, f), frozen, params)
    if self.kind == "league":
      take = (step % self.every) == 0
      slot = frozen[LEAGUE_COUNT] % self.size
      stacked = jax.tree.map(
          lambda f, p: jnp.where(take, jax.lax.dynamic_update_index_in_dim(f, p, slot, 0), f),
          frozen[LEAGUE_PARAMS], params)
      return {LEAGUE_PARAMS: stacked, LEAGUE_COUNT: frozen[LEAGUE_COUNT] + take.astype(jnp.int32)}
    return jax.tree.map(lambda f, p: (self.decay * f + (1.0 - self.decay) * p).astype(f.dtype),
                        frozen, params)


def snapshot(learner: str) -> Follower:
  return Follower(learner, "snapshot")


def lagged(learner: str, every: int) -> Follower:
  return Follower(learner, "lagged", every=every)


def ema(learner: str, decay: float) -> Follower:
  return Follower(learner, "ema", decay=decay)


def league(learner: str, size: int, every: int) -> Follower:
  return Follower(learner, "league", every=every, size=size)


def _positive_int(x) -> bool:
  return not isinstance(x, bool) and isinstance(x, int) and x >= 1


@dataclasses.dataclass(frozen=True)
class RoleBaselines:
  """Per seat, an EMA of the seat's mean reward over the steps (starting at 0):
  ``b <- decay * b + (1 - decay) * mean(judgments["<seat>/rewards"])`` after each step."""
  decay: float = 0.95
  learner = None          # follows no learner
  kind = "role_baselines"

  def __post_init__(self):
    if not 0.0 <= self.decay < 1.0:
      raise ValueError(f"role_baselines(decay={self.decay!r}): decay must be in [0, 1)")

  def init(self) -> dict:
    return {seat: jnp.zeros((), jnp.float32) for seat in records.SEATS}

  def observe(self, baselines: Mapping[str, Any], judgments: Mapping[str, Any]) -> dict:
    out = dict(baselines)
    for seat in records.SEATS:
      rewards = judgments.get(records.seat_key(seat, "rewards"))
      if rewards is not None:
        mean = jax.lax.stop_gradient(jnp.mean(rewards)).astype(jnp.float32)
        out[seat] = self.decay * baselines[seat] + (1.0 - self.decay) * mean
    return out


def role_baselines(decay: float = 0.95) -> RoleBaselines:
  return RoleBaselines(decay)


def init_followers(followers: Mapping[str, Any], params: Mapping[str, Any]) -> dict:
  """Each follower's starting params: a fresh copy of its learner's (the step donates them); a
  league starts with the learner's initial params as its one member (every slot holds them);
  role baselines start at 0."""
  missing = {n: f.learner for n, f in followers.items()
             if f.learner is not None and f.learner not in params}
  if missing:
    raise KeyError(f"followers {missing} follow learners that do not exist; the learners are "
                   f"{sorted(params)}")
  out = {}
  for name, f in followers.items():
    if isinstance(f, RoleBaselines):
      out[name] = f.init()
    elif f.kind == "league":
      out[name] = {LEAGUE_PARAMS: jax.tree.map(
          lambda p, n=f.size: jnp.repeat(jnp.asarray(p)[None], n, axis=0), params[f.learner]),
                   LEAGUE_COUNT: jnp.ones((), jnp.int32)}
    else:
      out[name] = jax.tree.map(jnp.copy, params[f.learner])
  return out


def is_league(value: Any) -> bool:
  return isinstance(value, Mapping) and set(value) == {LEAGUE_PARAMS, LEAGUE_COUNT}


def league_member(value: Mapping[str, Any], slot: int) -> Any:
  """The params in a league's ``slot``."""
  return jax.tree.map(lambda x: x[slot], value[LEAGUE_PARAMS])


def league_members(value: Mapping[str, Any]) -> jax.Array:
  """How many members a league holds (``<= size``)."""
  size = jax.tree.leaves(value[LEAGUE_PARAMS])[0].shape[0]
  return jnp.minimum(value[LEAGUE_COUNT], size)


@dataclasses.dataclass(frozen=True)
class Keeper:
  """Keeps a set of followers; ``after`` is a ``Game.after`` function."""
  followers: Mapping[str, Follower]

  def update(self, frozen: Mapping[str, Any], params: Mapping[str, Any], step,
             judgments: Mapping[str, Any] | None = None) -> dict:
    out = dict(frozen)
    for name, f in self.followers.items():
      if isinstance(f, RoleBaselines):
        out[name] = f.observe(frozen[name], judgments or {})
      else:
        out[name] = f.update(frozen[name], params[f.learner], step)
    return out

  def after(self, old_state, new_state, judgments=None):
    del old_state
    return new_state.replace(frozen=self.update(new_state.frozen, new_state.params,
                                                new_state.step, judgments))


def follow(followers: Mapping[str, Follower]) -> Keeper:
  return Keeper(dict(followers))


MIXTURE_KEYS = ("mixture_a", "mixture_b", "beta")


@dataclasses.dataclass(frozen=True)
class Mixture:
  """A seat's policy proportional to ``pi_a^(1 - beta) * pi_b^beta`` (players ``a`` and ``b``)."""
  a: str
  b: str
  beta: float

  def __post_init__(self):
    if not 0.0 <= self.beta <= 1.0:
      raise ValueError(f"mixture({self.a!r}, {self.b!r}, beta={self.beta!r}): beta must be in "
                       "[0, 1]")

  @property
  def parts(self) -> tuple[str, str]:
    return (self.a, self.b)

  def resolve(self, params_of) -> dict:
    """The params the seat plays with: both players' and the weight."""
    return {"mixture_a": params_of(self.a), "mixture_b": params_of(self.b),
            "beta": jnp.asarray(self.beta, jnp.float32)}


def mixture(policy: str, reference: str, beta: float) -> Mixture:
  return Mixture(policy, reference, beta)


def is_mixture(value: Any) -> bool:
  return isinstance(value, Mapping) and set(value) == set(MIXTURE_KEYS)


def mix_logprobs(logp_a: jax.Array, logp_b: jax.Array, beta) -> jax.Array:
  """Log-probs of the normalised geometric mixture ``p_a^(1 - beta) p_b^beta``."""
  return jax.nn.log_softmax((1.0 - beta) * logp_a + beta * logp_b, axis=-1)
