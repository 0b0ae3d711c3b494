"""Talking to a trained model: completions of text prompts with the KV-cached sampler.

``complete(cfg, params, prompts, ...)`` encodes each prompt as the opponent's opening move
(``BOS + text``, as the arena and ``local_text`` records begin), samples ``num_samples``
completions of each (greedy at temperature 0; else temperature / top-k / top-p), in fixed-shape
batches, and decodes them up to the first EOS. ``gamejax generate`` (``gamejax.cli``) calls it on a
stage's checkpoint.

>>> import jax
>>> from gamejax.models import llama
>>> cfg = llama.LlamaConfig(vocab_size=272, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
...                         d_ff=32)
>>> params = llama.init_params(cfg, jax.random.key(0))
>>> out = complete(cfg, params, ["12+3="], max_new_tokens=4, num_samples=2, temperature=1.0)
>>> [(o["prompt"], o["sample"], o["tokens"] <= 4) for o in out]
[('12+3=', 0, True), ('12+3=', 1, True)]
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from gamejax import sampling
from gamejax.data.tokenizer import ByteTokenizer
from gamejax.models import lm


def encode_prompt(tok, prompt: str) -> np.ndarray:
  """A prompt's ids: a chat model's (a tokenizer with a chat template) as the user's message with
  the assistant's turn opened (``apply_chat_template(..., add_generation_prompt=True)``), else
  ``BOS + prompt`` (BOS where the tokenizer adds one).

  >>> encode_prompt(ByteTokenizer(), "hi").tolist()
  [1, 107, 108]
  """
  if getattr(tok, "chat_template", None):
    return tok.encode_chat_prompt([{"role": "user", "content": prompt}])
  bos = [tok.bos_id] if getattr(tok, "add_bos", True) and tok.bos_id is not None else []
  return np.concatenate([bos, tok.encode(prompt)]).astype(np.int32)


def complete(cfg: lm.Config, params: Any, prompts: Sequence[str], max_new_tokens: int,
             num_samples: int = 1, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, batch_size: int = 64, tokenizer=None,
             cache_block: int = sampling.DECODE_CACHE_BLOCK) -> list[dict]:
  """One dict per (prompt, sample), prompts in order: ``prompt``, ``sample`` (0-based),
  ``completion`` (text up to the end-of-move token), ``tokens`` (how many were generated, that
  token included), ``token_ids`` (them) and ``stopped`` (False: the completion ran into ``max_new_tokens``). ``tokenizer``: the byte
  tokenizer by default; a chat model's puts each prompt in its chat template (``encode_prompt``).
  ``cache_block``: the sampler's decode loop in runs (``sampling.generate``)."""
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1; got {num_samples}")
  if not prompts:
    raise ValueError("no prompts given")
  tok = tokenizer or ByteTokenizer()
  encoded = [encode_prompt(tok, p) for p in prompts]
  rows = [(i, s) for i in range(len(prompts)) for s in range(num_samples)]
  width = max(len(e) for e in encoded)
  batch = min(batch_size, len(rows))
  generate = sampling.make_generate(cfg, max_new_tokens, temperature=temperature,
                                    eos_id=tok.eos_id, top_k=top_k, top_p=top_p,
                                    cache_block=cache_block)
  out = []
  for call, start in enumerate(range(0, len(rows), batch)):
    chunk = rows[start:start + batch]
    padded = chunk + [chunk[-1]] * (batch - len(chunk))      # static shapes: pad the last call
    prompt_BP, lengths_B = sampling.left_pad([encoded[i] for i, _ in padded], width)
    result = jax.device_get(generate(params, prompt_BP, lengths_B,
                                     jax.random.fold_in(jax.random.PRNGKey(seed), call)))
    for row, (i, s) in enumerate(chunk):
      n = int(result["lengths"][row])
      generated = result["tokens"][row, :n]
      out.append({"prompt": prompts[i], "sample": s,
                  "completion": tok.decode_until_eos(generated), "tokens": n,
                  "token_ids": [int(t) for t in generated],
                  "stopped": bool(result["stopped_B"][row])})
  return out
