"""Opponents that answer the agent's move in a multi-turn game (``sampled_play(turns > 1)``).

An opponent is ``opponent(completion_BN, facts, rng) -> (reply_BR, reply_mask_BR)``: it reads the
agent's last move (PAD after its stop) and the batch's facts, and replies with up to ``R`` tokens
(``reply_mask_BR`` marks them). Its tokens are attributed to the opponent in the record.

>>> import jax.numpy as jnp
>>> from gamejax.data.tokenizer import ByteTokenizer
>>> tok = ByteTokenizer()
>>> reply = arena_feedback()
>>> completion = jnp.asarray([list(tok.encode("0+1+0=01|1")) + [2]])
>>> tokens, mask = reply(completion, {"answer_digits": jnp.asarray([[-1, 2]])}, None)
>>> tok.decode(tokens[0][mask[0] > 0])
'\\nwrong, again:'
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gamejax.data.tokenizer import ByteTokenizer
from gamejax.players import judges


def _encoded(texts):
  tok = ByteTokenizer()
  ids = [tok.encode(t) for t in texts]
  width = max(len(i) for i in ids)
  table = np.zeros((len(ids), width), np.int32)
  for row, i in enumerate(ids):
    table[row, :len(i)] = i
  return jnp.asarray(table), jnp.asarray(table > 0, jnp.float32)


def fixed_reply(text: str):
  """The same reply to every move (e.g. ``"\\ncheck your answer:"``)."""
  if not text:
    raise ValueError("fixed_reply needs a non-empty text")
  table, mask = _encoded([text])

  def opponent(completion_BN, facts, rng):
    del facts, rng
    b = completion_BN.shape[0]
    return jnp.broadcast_to(table, (b, table.shape[1])), jnp.broadcast_to(mask, (b, mask.shape[1]))

  return opponent


def arena_feedback(right: str = "\nright, again:", wrong: str = "\nwrong, again:"):
  """The arena's opponent tells the agent whether its answer was right (the verifiable judge on
  ``facts["answer_digits"]``) and asks again."""
  if not right or not wrong:
    raise ValueError("arena_feedback needs non-empty replies")
  table, mask = _encoded([wrong, right])

  def opponent(completion_BN, facts, rng):
    del rng
    exact_B, _ = jax.vmap(judges.arena_grade)(completion_BN, facts[judges.ANSWER_KEY])
    pick_B = exact_B.astype(jnp.int32)
    return table[pick_B], mask[pick_B]

  return opponent
