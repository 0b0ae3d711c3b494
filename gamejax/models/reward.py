"""A reward model: the Llama trunk with a scalar head, scoring every position of a transcript.

``apply`` gives a score per position (``float32[B, T]``): the head ``w . h_t + b`` on the trunk's
final hidden state at ``t``, which has read tokens ``<= t`` of ``t``'s segment. A transcript's
score is the score at its last agent token (the EOS, when the agent finished), so the reward
model judges the whole exchange; ``sequence_scores`` picks it out per row. The reward model
reads the policy's tokens, so both must share a vocabulary (``check_compatible``).

>>> import jax, numpy as np
>>> from gamejax import records
>>> from gamejax.models import llama
>>> cfg = llama.LlamaConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)
>>> params = init_params(cfg, jax.random.key(0))
>>> sorted(params), params["head"]["w"].shape
(['head', 'trunk'], (16,))
>>> rec = records.from_transcripts([(np.array([1, 5, 6, 2]), np.array([2, 2, 1, 1]))], 6)
>>> scores_BT = apply(cfg, params, rec.tokens, rec.positions, rec.segment_ids)
>>> scores_BT.shape, sequence_scores(scores_BT, rec).shape
((1, 6), (1,))
"""
from __future__ import annotations

from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp

from gamejax import records
from gamejax.models import lm

Params = Any


class RewardModelError(ValueError):
  """A reward model that cannot judge the given policy (or is configured wrongly)."""


def init_params(cfg: lm.Config, rng) -> Params:
  """``{"trunk": the LM's params (no LM head), "head": {"w": float32[D], "b": float32[]}}``.

  The head starts at zero, so every transcript first scores 0 (a Bradley-Terry loss of log 2).
  To start from a trained policy, put its params in ``"trunk"`` (an ``"lm_head"`` there is unused).
  """
  trunk = lm.init_params(cfg, rng)
  trunk.pop("lm_head", None)  # untied embeddings: the reward model has no LM head
  head = {"w": jnp.zeros((cfg.d_model,), jnp.float32), "b": jnp.zeros((), jnp.float32)}
  return {"trunk": trunk, "head": head}


def apply(cfg: lm.Config, params: Params, tokens_BT, positions_BT, segment_ids_BT):
  """``float32[B, T]``: the score of every position (padding positions hold meaningless scores)."""
  hidden_BTD = lm.hidden(cfg, params["trunk"], tokens_BT, positions_BT, segment_ids_BT)
  w_D = jnp.asarray(params["head"]["w"], jnp.float32)
  b = jnp.asarray(params["head"]["b"], jnp.float32)
  chex.assert_shape(w_D, (cfg.d_model,))
  chex.assert_rank(b, 0)
  return jnp.einsum("btd,d->bt", hidden_BTD, w_D, precision="highest") + b


def _last_score(scores_T, mask_T):
  """The score at the last position where ``mask_T`` holds (0 when it holds nowhere)."""
  chex.assert_rank([scores_T, mask_T], 1)
  t = scores_T.shape[0]
  last = t - 1 - jnp.argmax(mask_T[::-1].astype(jnp.int32))
  return jnp.where(mask_T.any(), scores_T[last], 0.0)


def sequence_scores(scores_BT: jax.Array, record: records.GameRecord,
                    players: Sequence[str | int] = ("agent",)) -> jax.Array:
  """``float32[B]``: per row, the score at the last token moved by ``players`` (the agent's EOS).

  For records of one transcript per row (left or right padded); a row where ``players`` moved
  nothing scores 0.

  >>> import numpy as np
  >>> rec = records.from_transcripts([(np.array([1, 5, 6, 2]), np.array([2, 2, 1, 1]))], 6)
  >>> sequence_scores(jnp.arange(6.0)[None], rec).tolist()
  [3.0]
  """
  chex.assert_rank([scores_BT, record.tokens], 2)
  chex.assert_equal_shape([scores_BT, record.players, record.segment_ids])
  players_BT = jnp.asarray(record.players)
  moved_BT = jnp.zeros(players_BT.shape, bool)
  for i in records.player_ids(players):
    moved_BT = moved_BT | (players_BT == i)
  mask_BT = moved_BT & (jnp.asarray(record.segment_ids) > 0)
  return jax.vmap(_last_score)(jnp.asarray(scores_BT, jnp.float32), mask_BT)


def vocab_size(params: Params) -> int:
  """The number of token ids the reward model's embedding reads."""
  return int(params["trunk"]["embedding"].shape[0])


def check_compatible(policy_cfg: lm.Config, reward_cfg: lm.Config) -> None:
  """Raises ``RewardModelError`` unless the reward model reads the policy's token ids.

  >>> from gamejax.models import llama
  >>> check_compatible(llama.LlamaConfig(vocab_size=320), llama.LlamaConfig(vocab_size=256))
  Traceback (most recent call last):
  ...
  gamejax.models.reward.RewardModelError: reward model vocab_size=256 differs from the policy's vocab_size=320: the reward model must read the policy's token ids (use the same tokenizer and vocab_size)
  """
  if policy_cfg.vocab_size != reward_cfg.vocab_size:
    raise RewardModelError(
        f"reward model vocab_size={reward_cfg.vocab_size} differs from the policy's "
        f"vocab_size={policy_cfg.vocab_size}: the reward model must read the policy's token ids "
        f"(use the same tokenizer and vocab_size)")
