"""What a payoff is: a pure function of a player's params and the play it is judged on.

A payoff returns a scalar the player *maximises* and a dict of named metrics:

    payoff(params, play: Play) -> (value, metrics)

``Play`` bundles what the game step knows when it scores a player: the player's pure ``apply``
(``apply(params, tokens, positions, segment_ids) -> logits_BTV``), the moves (a ``GameRecord``),
the opponent's judgments (a dict; empty when the opponent is a data source), a PRNG key and the
frozen players' params.
Payoffs are plain Python: they import neither the step, gin nor checkpointing.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax

from gamejax.records import GameRecord

Metrics = Mapping[str, jax.Array]


class Play(NamedTuple):
  apply: Callable[..., jax.Array]
  moves: GameRecord
  judgments: Mapping[str, Any]
  rng: jax.Array
  # The players that do not learn (``GameState.frozen``: a magnet, a reference), read by payoffs
  # that evaluate them in the learner's own ``apply`` (MMD's magnet). Constants: no gradient.
  frozen: Mapping[str, Any] = {}


Payoff = Callable[[Any, Play], tuple[jax.Array, Metrics]]
