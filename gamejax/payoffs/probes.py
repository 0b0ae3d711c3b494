"""Probes: payoffs of value 0 that only measure the learner, in the compiled step.

A probe is a payoff part weighted 0 (``weighted({"pg": (1.0, ...), "probe": (0.0,
first_move_probe(...))})``): it adds no gradient, and its metrics are exact functions of the
current params, not of the sampled moves.

``first_move_probe(moves, target)`` reads the seat's distribution over its first move, at each
row's decision point (the prompt: it does not depend on what was sampled), averaged over the rows
in which the seat moved. In the cyclic preference game that is the policy's mixed strategy over
the three styles, and ``distance`` is its total variation from the equilibrium, every unlisted
first move counted in full: the exact figure that sampled frequencies only estimate.

>>> import jax, jax.numpy as jnp, numpy as np
>>> from gamejax import records
>>> from gamejax.payoffs import Play
>>> C, A = records.CHANCE, records.AGENT
>>> moves = jax.tree.map(jnp.asarray, records.from_transcripts(
...     [(np.array([1, 4, 5]), np.array([C, C, A]))], seq_len=3))
>>> apply = lambda params, tokens, positions, segment_ids: params[tokens]   # bigram logits
>>> logits = jnp.zeros((8, 8)).at[4, 5].set(jnp.log(3.0))    # after token 4: P(5) = 3/10
>>> value, m = first_move_probe(token_ids=(5, 6), target=(0.5, 0.5))(logits, Play(
...     apply, moves, {}, jax.random.PRNGKey(0)))
>>> [round(float(x), 4) for x in (value, m["p_5"], m["p_6"], m["p_other"], m["distance"])]
[0.0, 0.3, 0.1, 0.6, 0.6]
"""
from __future__ import annotations

from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from gamejax import records
from gamejax.data.tokenizer import ByteTokenizer
from gamejax.payoffs.base import Payoff, Play, frozen_player, moves_logits


def _first_move_ids(moves: Sequence[str] | None, token_ids: Sequence[int] | None) -> tuple:
  if (moves is None) == (token_ids is None):
    raise ValueError("first_move_probe: give the moves as texts (moves=('A', 'B', 'C'), one token "
                     "each) or as token_ids, not both")
  if token_ids is not None:
    ids, names = tuple(int(t) for t in token_ids), tuple(str(int(t)) for t in token_ids)
  else:
    tok = ByteTokenizer()
    encoded = [tok.encode(m) for m in moves]
    if any(not isinstance(m, str) or len(e) != 1 for m, e in zip(moves, encoded)):
      raise ValueError(f"first_move_probe.moves={tuple(moves)!r}: each move must be one token")
    ids, names = tuple(int(e[0]) for e in encoded), tuple(moves)
  if not ids or len(set(ids)) != len(ids):
    raise ValueError(f"first_move_probe: expected distinct first moves, got {names!r}")
  return ids, names


def first_move_probe(moves: Sequence[str] | None = None, target: Sequence[float] | None = None,
                     seat: str = "agent", token_ids: Sequence[int] | None = None,
                     player: str | None = None) -> Payoff:
  """A probe (value 0) of ``seat``'s first-move distribution: metrics ``p_<move>`` (its mean
  probability of each of ``moves``, one token each), ``p_other`` (of any other first move) and,
  with a ``target`` distribution over ``moves``, ``distance``: the total variation between the
  two, ``p_other`` counted in full. The probabilities are the learner's ``apply``'s, at the
  stage's scoring temperature when it scores there, of the learner's params or, with ``player``,
  of that frozen player's (e.g. ``"ema"``, an exponential moving average of the learner's params:
  ``Stage.followers = {"ema": ema("agent", 0.99)}``)."""
  ids, names = _first_move_ids(moves, token_ids)
  records.seat_key(seat, "")
  target_S = None
  if target is not None:
    target_S = np.asarray(target, np.float64)
    if target_S.shape != (len(ids),) or (target_S < 0).any() or abs(target_S.sum() - 1) > 1e-6:
      raise ValueError(f"first_move_probe.target={tuple(target)!r}: expected a distribution over "
                       f"the {len(ids)} moves {names!r}")
    target_S = jnp.asarray(target_S, jnp.float32)
  ids_S = jnp.asarray(ids, jnp.int32)

  def payoff(params: Any, play: Play):
    moves_ = play.moves
    chex.assert_rank(moves_.tokens, 2)
    params = (jax.lax.stop_gradient(params) if player is None
              else frozen_player(play, player, "first_move_probe"))
    logits_BTV = moves_logits(play.apply, params, moves_)
    mask_BT = records.next_token_weights(moves_, (seat,))
    first_BT = (jnp.cumsum(mask_BT, axis=1) == 1) & (mask_BT > 0)     # the seat's first move
    p_BTS = jax.nn.softmax(logits_BTV, axis=-1)[..., ids_S]
    p_BS = (p_BTS * first_BT[..., None]).sum(1)
    moved_B = first_BT.any(1).astype(jnp.float32)
    p_S = (p_BS * moved_B[:, None]).sum(0) / jnp.maximum(moved_B.sum(), 1.0)
    metrics = {f"p_{name}": p for name, p in zip(names, p_S)}
    metrics["p_other"] = 1.0 - p_S.sum()
    if target_S is not None:
      metrics["distance"] = 0.5 * (jnp.abs(p_S - target_S).sum() + metrics["p_other"])
    return jnp.zeros((), jnp.float32), metrics

  if player is not None:
    payoff.frozen_players = (player,)    # the run checks the stage has it
  return payoff
