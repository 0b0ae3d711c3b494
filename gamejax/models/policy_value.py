"""A policy with a value head (PPO's actor-critic): one Llama trunk, the LM head and a scalar head.

``apply`` returns ``(logits_BTV, values_BT)`` from one pass of the trunk: ``values_BT[t]`` is the
critic's estimate of the return after reading tokens ``<= t`` (the position that predicts token
``t + 1``, the alignment of ``records.next_token_weights``). The value head starts at zero.

>>> import jax, numpy as np
>>> from gamejax.models import llama
>>> cfg = llama.LlamaConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)
>>> params = init_params(cfg, jax.random.key(0))
>>> ones = np.ones((2, 3), np.int32)
>>> logits, values = apply(cfg, params, ones, ones - 1, ones)
>>> logits.shape, values.shape, float(abs(values).max())
((2, 3, 32), (2, 3), 0.0)
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from gamejax.models import lm, logprobs

Params = Any


def init_params(cfg: lm.Config, rng, policy: Params | None = None) -> Params:
  """``{"policy": the policy's params, "value": {"w": float32[D], "b": float32[]}}`` (``policy`` given:
  those params, e.g. an SFT model's)."""
  if policy is None:
    policy = lm.init_params(cfg, rng)
  value = {"w": jnp.zeros((cfg.d_model,), jnp.float32), "b": jnp.zeros((), jnp.float32)}
  return {"policy": policy, "value": value}


def apply(cfg: lm.Config, params: Params, tokens_BT, positions_BT, segment_ids_BT, *,
          targets=None, logits_map=None, scored_from: int = 0):
  """``(float32[B, T, V] logits, float32[B, T] values)``; with ``targets``, ``(logprobs.Scored,
  values)``: the policy's log-probs of the targets, argmax and entropy read ``cfg.logits_chunk``
  positions at a time (``gamejax.models.logprobs``), never the ``[B, T, V]`` logits, from
  position ``scored_from`` on (``lm.apply``'s); the values at every position."""
  hidden_BTD = lm.hidden(cfg, params["policy"], tokens_BT, positions_BT, segment_ids_BT)
  values_BT = jnp.einsum("btd,d->bt", hidden_BTD, params["value"]["w"].astype(jnp.float32),
                         precision="highest") + params["value"]["b"]
  logprobs.check_target_options("policy_value.apply", targets, logits_map, scored_from)
  if targets is None:
    return lm.lm_head(cfg, params["policy"], hidden_BTD), values_BT
  return lm.token_scores(cfg, params["policy"], hidden_BTD, targets, tokens_BT,
                         logits_map, scored_from), values_BT


def bind(cfg: lm.Config):
  """``apply`` of ``cfg``'s actor-critic as payoffs call it; with ``cfg.logits_chunk > 0`` it
  reads targets (``logprobs.reads_targets``), as ``lm.bind``'s does."""
  return lm.bind(cfg, apply)


def policy_params(params: Params) -> Params:
  """The policy's params alone (what samples, is evaluated and starts later stages)."""
  return params["policy"] if isinstance(params, dict) and "value" in params else params

