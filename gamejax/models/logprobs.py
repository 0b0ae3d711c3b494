"""Token log-probs read block by block: the LM head and its log-softmax over a few positions at a
time, so that a payoff never holds the ``[B, T, V]`` logits.

Every payoff that scores moved tokens (imitation, DPO/IPO, the RL payoffs, the reference's
log-probs) needs only ``log p(next token)`` at each position, not the whole distribution. At a
large vocabulary the logits dominate memory (``B * T * V`` floats, and their gradient as many
again: 512 x 512 tokens at 128k words is 134 GB in float32). A model config with
``logits_chunk = C > 0`` makes its apply (``lm.bind``) read them in blocks of ``C`` positions:

1. the trunk's states ``[B, T, D]`` (``lm.hidden``) are split into ``n = ceil(T / C)`` blocks
   of ``[B, ceil(T / n), D]``, at most ``C`` positions and the last block padded least (every row
   in each block, so that a batch sharded over rows stays so); a reader of sampled moves alone
   starts them at the record's first move (``GameRecord.opening``: a sampled play's prompts are
   not read);
2. each block's logits are computed, transformed as the apply's wrappers say (``logits_map``:
   a scoring temperature, a game's legal moves), reduced to the target's log-prob, the greedy
   token and the entropy (PPO's bonus), and dropped (``lax.map``);
3. the backward recomputes each block's logits (``jax.checkpoint``): the gradient of the head
   and of the states is accumulated block by block.

Peak memory: one block's ``[B, C, V]`` logits in place of ``[B, T, V]``, for one more LM-head
forward in the backward. ``logits_chunk = 0`` (the default) leaves every payoff on the logits,
as before.

The protocol: an apply that reads targets (``reads_targets(apply)``) takes ``targets=int32[B, T]``
(and ``logits_map=``) and returns ``Scored(logprobs, argmax, entropy)`` (an actor-critic,
``policy_value.bind``: ``(Scored, values)``); wrappers of an apply say so with ``same_protocol``
and add their transform of the logits with ``then``. Payoffs go through
``gamejax.payoffs.base.token_logprobs`` (PPO through its actor-critic reader), which fall back to
the logits for any other apply.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from gamejax.models.partitioning import constrain

LogitsMap = Callable[[jax.Array, jax.Array], jax.Array]   # (logits_BCV, tokens_BC) -> logits
READS_TARGETS = "reads_targets"


class Scored(NamedTuple):
  """What an apply that reads targets returns: ``logprobs`` ``float32[B, T]`` (at ``t``, ``log
  p(targets[t])``), ``argmax`` ``int32[B, T]`` (the most likely next token) and ``entropy``
  ``float32[B, T]`` (of each position's next-token distribution; computed only where read)."""
  logprobs: jax.Array
  argmax: jax.Array
  entropy: jax.Array


def check(name_of: str, chunk) -> str | None:
  """What is wrong with a config's ``logits_chunk`` (None: nothing)."""
  if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
    return (f"{name_of}.logits_chunk={chunk!r} must be a non-negative integer: positions per "
            "block of the LM head when payoffs read token log-probs, 0 for all at once")
  return None


def reads_targets(apply: Callable) -> bool:
  """Whether ``apply`` takes ``targets=`` and returns ``Scored`` (block by block)."""
  return bool(getattr(apply, READS_TARGETS, False))


def same_protocol(wrapper: Callable, inner: Callable) -> Callable:
  """``wrapper`` (a function of ``inner``'s arguments) marked as reading targets when ``inner``
  does; it must then pass ``targets`` and ``logits_map`` on (``then``)."""
  setattr(wrapper, READS_TARGETS, reads_targets(inner))
  return wrapper


def then(options: Mapping[str, Any], fn: LogitsMap) -> dict:
  """``options`` with ``fn`` applied to the logits before the ``logits_map`` they carry (a
  wrapper's transform comes before its caller's: ``at_temperature(legal_moves(apply))`` masks,
  then scales)."""
  outer = options.get("logits_map")
  composed = fn if outer is None else (lambda logits, tokens: outer(fn(logits, tokens), tokens))
  return {**options, "logits_map": composed}


def check_target_options(name: str, targets, logits_map, scored_from: int) -> None:
  """A ValueError naming ``name`` (an apply) where ``logits_map`` or ``scored_from`` is given
  without ``targets``: they say how targets are scored."""
  if targets is None and (logits_map is not None or scored_from):
    raise ValueError(f"{name}: logits_map and scored_from are read with targets only")


def entropy(logits_BTV: jax.Array) -> jax.Array:
  """``float32[B, T]``: the entropy of each position's next-token distribution."""
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  return -(jnp.exp(logp_BTV) * logp_BTV).sum(axis=-1)


def score(logits_BTV: jax.Array, targets_BT: jax.Array) -> Scored:
  """``Scored`` of full logits: ``logit[target] - logsumexp(logits)`` (in float32), argmax and
  entropy (what a caller does not read, XLA does not compute)."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  picked_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return Scored(picked_BT - jax.nn.logsumexp(logits_BTV, axis=-1),
                jnp.argmax(logits_BTV, axis=-1).astype(jnp.int32), entropy(logits_BTV))


def chunked(head: Callable[[jax.Array], jax.Array], hidden_BTD: jax.Array, targets_BT: jax.Array,
            tokens_BT: jax.Array, chunk: int, logits_map: LogitsMap | None = None,
            start: int = 0) -> Scored:
  """``Scored`` of ``head(hidden)``'s logits, ``chunk`` positions at a time (the module
  docstring; 0: all at once). ``tokens_BT``: the record's tokens, which ``logits_map`` reads (a
  game's legal moves follow the current token). ``start`` (static): the positions before it are
  not read -- no head there, forward or backward -- and score 0 (log-prob, greedy token and
  entropy)."""
  b, t = hidden_BTD.shape[:2]
  if not 0 <= start < t:
    raise ValueError(f"logprobs.chunked: start={start} must be in [0, {t}), the record's length")
  if start:
    scored = chunked(head, hidden_BTD[:, start:], targets_BT[:, start:], tokens_BT[:, start:],
                     chunk, logits_map)
    return Scored(*(jnp.pad(x, ((0, 0), (start, 0))) for x in scored))
  chunk = min(int(chunk), t) or t
  targets_BT, tokens_BT = (jnp.asarray(x, jnp.int32) for x in (targets_BT, tokens_BT))
  n = -(-t // chunk)
  chunk = -(-t // n)     # as many blocks, each as short as they can be: the last one least padded
  pad = n * chunk - t

  def blocks(x):
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)

  @jax.checkpoint
  def one(block):
    x_BCD, targets_BC, tokens_BC = block
    logits_BCV = constrain(head(x_BCD).astype(jnp.float32), ("batch", "length", "vocab"))
    if logits_map is not None:
      logits_BCV = logits_map(logits_BCV, tokens_BC)
    return score(logits_BCV, targets_BC)

  out = jax.lax.map(one, (blocks(hidden_BTD), blocks(targets_BT), blocks(tokens_BT)))
  return Scored(*(jnp.moveaxis(x, 0, 1).reshape(b, n * chunk)[:, :t] for x in out))
