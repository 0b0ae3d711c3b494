"""The language-model interface: every use of a model goes through these functions, which call
the family of the config given (``gamejax.models.families``: Llama, Qwen2, Qwen3, GPT-2, ...).

A config is a family's frozen dataclass (``LlamaConfig``, ``Qwen2Config``, ``GPT2Config``, ...);
params are a nested dict of arrays. Every forward takes ``tokens``, ``positions`` (restarting at 0
per packed segment) and ``segment_ids`` (1, 2, ... per segment, 0 for padding), all ``int32[B, T]``.

>>> import jax, numpy as np
>>> from gamejax.models.qwen3 import Qwen3Config
>>> cfg = Qwen3Config(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)
>>> params = init_params(cfg, jax.random.key(0))
>>> ones = np.ones((1, 4), np.int32)
>>> apply(cfg, params, ones, np.arange(4, dtype=np.int32)[None], ones).shape
(1, 4, 32)
"""
from __future__ import annotations

import functools
from typing import Any

from gamejax.models import families, kernels, logprobs

Config = Any    # a family's config dataclass
Params = Any


def init_params(cfg: Config, rng) -> Params:
  """Initial parameters of the model of ``cfg``."""
  return families.of_config(cfg).init_params(cfg, rng)


def apply(cfg: Config, params: Params, tokens_BT, positions_BT, segment_ids_BT, *,
          shared_prompt=None, targets=None, logits_map=None, scored_from: int = 0):
  """``float32[B, T, V]``: next-token logits at every position (full forward).

  ``shared_prompt``: the record's ``records.SharedPrompt``; each group's prompt is then computed
  once (``gamejax.models.shared_prompt``), for the same logits.

  ``targets`` (``int32[B, T]``): ``logprobs.Scored`` in place of the logits -- each position's
  log-prob of its target and greedy token, the LM head read ``cfg.logits_chunk`` positions at a
  time (all at once when 0) after ``logits_map`` (``gamejax.models.logprobs``), and only from
  position ``scored_from`` on (the LM head is not run before it; 0 is scored there)."""
  inputs = (tokens_BT, positions_BT, segment_ids_BT)
  logprobs.check_target_options("lm.apply", targets, logits_map, scored_from)
  if shared_prompt is not None:
    from gamejax.models import shared_prompt as shared    # it calls back into this module
    if targets is None:
      return shared.apply(cfg, params, *inputs, shared_prompt)
    states_BTD = shared.once(cfg, params, *inputs, shared_prompt, head=False)
  elif targets is None:
    return families.of_config(cfg).apply(cfg, params, *inputs)
  else:
    states_BTD = hidden(cfg, params, *inputs)
  return token_scores(cfg, params, states_BTD, targets, tokens_BT, logits_map, scored_from)


def token_scores(cfg: Config, params: Params, hidden_BTD, targets_BT, tokens_BT,
                 logits_map=None, scored_from: int = 0):
  """``logprobs.Scored`` of the LM head on ``hidden``'s states at ``targets``, read
  ``cfg.logits_chunk`` positions at a time (all at once when 0) after ``logits_map``, from
  position ``scored_from`` on (0 before it)."""
  return logprobs.chunked(lambda x: lm_head(cfg, params, x), hidden_BTD, targets_BT, tokens_BT,
                          getattr(cfg, "logits_chunk", 0), logits_map, scored_from)


def bind(cfg: Config, fn=None):
  """``fn`` (default ``apply``; an actor-critic's, ``policy_value.apply``) of ``cfg``'s model as
  payoffs call it: ``bind(cfg)(params, tokens, positions, segment_ids, **options)``. With
  ``cfg.logits_chunk > 0`` it reads targets (``logprobs.reads_targets``): payoffs then get token
  log-probs block by block, never the ``[B, T, V]`` logits."""
  bound = functools.partial(apply if fn is None else fn, cfg)
  setattr(bound, logprobs.READS_TARGETS, getattr(cfg, "logits_chunk", 0) > 0)
  return bound


def hidden(cfg: Config, params: Params, tokens_BT, positions_BT, segment_ids_BT):
  """``float32[B, T, D]``: the trunk's states, what the LM head (or a reward head) reads."""
  return families.of_config(cfg).hidden(cfg, params, tokens_BT, positions_BT, segment_ids_BT)


def lm_head(cfg: Config, params: Params, hidden_BTD):
  """``float32[B, T, V]``: the LM head on ``hidden``'s states."""
  return families.of_config(cfg).lm_head(cfg, params, hidden_BTD)


def init_cache(cfg: Config, batch: int, max_len: int):
  """An empty decoding cache for ``batch`` rows of ``max_len`` slots."""
  return families.of_config(cfg).init_cache(cfg, batch, max_len)


def grow_cache(cache, max_len: int):
  """``cache`` with empty slots appended up to ``max_len`` (every family's cache is laid out as
  ``kernels.init_kv_cache``'s, with ``segment_ids [B, S]``)."""
  return {"layers": tuple(kernels.grow_kv_cache(layer, max_len) for layer in cache["layers"]),
          "segment_ids": kernels.grow_slots(cache["segment_ids"], max_len, axis=1)}


def apply_with_cache(cfg: Config, params: Params, tokens_BT, positions_BT, segment_ids_BT, cache,
                     cache_index, *, rope=None, bias=None, trained: bool = False,
                     hidden: bool = False):
  """Cached forward: writes the new tokens at ``cache_index ..`` and returns ``(logits, cache)``;
  prefill then one-token steps give the full forward's logits.

  A decode loop may pass what it computed ahead of the loop: ``rope``, the ``rope_tables`` of
  ``positions_BT`` (families with RoPE), and ``bias``, the attention's additive bias ``float32[B,
  T, S]`` (the cache's segment ids are then left as they are; ``llama.apply_with_cache``).
  ``trained``: the cached forward is differentiated (its blocks rematerialise as ``cfg.remat``
  says); ``hidden``: the final norm's states ``[B, T, D]`` in place of the logits (``lm_head``).
  """
  extra = {"bias": bias} if rope is None else {"bias": bias, "rope": rope}
  extra.update({k: True for k, on in (("trained", trained), ("hidden", hidden)) if on})
  return families.of_config(cfg).apply_with_cache(cfg, params, tokens_BT, positions_BT,
                                                  segment_ids_BT, cache, cache_index, **extra)


def rope_tables(cfg: Config, positions_BT):
  """RoPE's ``(cos, sin)`` at ``positions`` as ``apply_with_cache(rope=)`` takes them, or None for
  a family without RoPE."""
  family = families.of_config(cfg)
  return family.rope_tables(cfg, positions_BT) if hasattr(family, "rope_tables") else None


def decode_params(cfg: Config, params: Params) -> Params:
  """``params`` as a decode loop reads them, prepared once before it (the family's
  ``decode_params``; most families read their params as they are). ``apply_with_cache`` takes
  either form and gives the same logits."""
  family = families.of_config(cfg)
  return family.decode_params(cfg, params) if hasattr(family, "decode_params") else params


def fused_storage(cfg: Config) -> tuple:
  """The weights the family stores fused (``gamejax.models.fusion.Fused`` specs; ``()`` for
  none): checkpoints and LoRA name the standard weights, the params tree holds their join."""
  family = families.of_config(cfg)
  return tuple(family.fused_storage(cfg)) if hasattr(family, "fused_storage") else ()


def param_count(cfg: Config) -> int:
  return families.of_config(cfg).param_count(cfg)


def matmul_params(cfg: Config) -> int:
  return families.of_config(cfg).matmul_params(cfg)


def flops_per_token(cfg: Config, seq_len: int) -> float:
  """Training FLOPs per token (forward and backward), for MFU."""
  return families.of_config(cfg).flops_per_token(cfg, seq_len)
