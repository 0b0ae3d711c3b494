"""The agent plays: its moves are sampled from its current params inside the game step.

``sampled_play(...)`` is a game's ``play`` function: given a batch of prompts (the opponent's
opening moves, left-padded, see ``gamejax.data.prompts``) it samples ``group_size`` completions of
each prompt with the KV-cached sampler and returns the moves as one ``GameRecord`` (prompt tokens
attributed to the opponent, completion tokens to the agent) plus the facts of playing, one row per
completion in group-major order (the ``G`` completions of prompt ``g`` are rows ``g*G .. g*G+G-1``):

- ``behaviour_logprobs``: float32[B, T], the sampling policy's log-prob of each agent token, at
  the position that predicts it (temperature-1, unfiltered; see ``sampling.generate``);
- ``completion_mask``: float32[B, N]; ``stopped``: bool[B] (False: the row hit the length limit);
- every other batch field (e.g. the judge's answer key) repeated ``group_size`` times;
- ``metrics``: the fraction of completions without a stop token, the mean completion length.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from gamejax import records, sampling
from gamejax.data.tokenizer import EOS
from gamejax.models import llama

PROMPT_KEYS = ("prompt", "prompt_lengths")


def sampled_play(cfg: llama.LlamaConfig, group_size: int, max_new_tokens: int,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 eos_id: int = EOS, stop_ids: Sequence[int] = (), player: str = "agent"):
  """``play(state, batch, rng) -> (moves, facts)`` sampling ``state.params[player]``."""
  if group_size < 1:
    raise ValueError(f"sampled_play group_size must be >= 1; got {group_size}")
  stop_ids = tuple(int(s) for s in stop_ids)

  def play(state, batch, rng):
    missing = [k for k in PROMPT_KEYS if k not in batch]
    if missing:
      raise KeyError(f"sampled_play needs prompt batches with {PROMPT_KEYS}; missing {missing}")
    repeat = lambda x: jnp.repeat(jnp.asarray(x), group_size, axis=0)
    prompt_BP, lengths_B = repeat(batch["prompt"]), repeat(batch["prompt_lengths"])
    params = jax.lax.stop_gradient(state.params[player])
    out = sampling.generate(cfg, params, prompt_BP, lengths_B, max_new_tokens, rng,
                            temperature, eos_id, top_k=top_k, top_p=top_p, stop_ids=stop_ids)
    moves = records.with_completions(prompt_BP, lengths_B, out["tokens"], out["mask_BN"])
    p, t = prompt_BP.shape[1], moves.tokens.shape[1]
    facts = {k: repeat(v) for k, v in batch.items() if k not in PROMPT_KEYS}
    stopped_B = out["stopped_B"]
    facts.update({
        "behaviour_logprobs": records.align_to_next_tokens(out["logprobs"] * out["mask_BN"], p, t),
        "completion_mask": out["mask_BN"], "stopped": stopped_B,
        "metrics": {"play/no_stop": 1.0 - stopped_B.astype(jnp.float32).mean(),
                    "play/completion_tokens": out["mask_BN"].sum(),
                    "play/completion_length": out["lengths"].astype(jnp.float32).mean()}})
    return moves, facts

  return play
