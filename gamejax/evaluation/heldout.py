"""Held-out loss and perplexity: the model's mean negative log-likelihood of the moves a stage
imitates, on the test split of its data (records it never trained on).

Each test record is one row (cut to ``seq_len``, as training truncates), batched with padding to a
static ``[batch_size, seq_len]``; the loss is the mean over every scored token of the split,
perplexity its exponential.

>>> import jax, numpy as np
>>> from gamejax.models import llama
>>> cfg = llama.LlamaConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)
>>> params = llama.init_params(cfg, jax.random.key(0))
>>> test = [{"tokens": np.array([1, 5, 6, 2]), "players": np.array([2, 2, 1, 1])}]
>>> out = heldout_loss(cfg, params, test, ("agent",), seq_len=8)
>>> out["heldout_tokens"], round(out["heldout_perplexity"]) in range(20, 50)
(2, True)
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import numpy as np

from gamejax import records
from gamejax.models import lm
from gamejax.payoffs.base import token_logprobs


@functools.partial(jax.jit, static_argnames=("cfg", "players"))
def _nll(cfg: lm.Config, params, record: records.GameRecord, players: tuple[int, ...]):
  """(summed negative log-likelihood, number of scored tokens) of one batch."""
  loglik_BT = token_logprobs(lm.bind(cfg), params, record).logprobs   # by blocks: logits_chunk
  weights_BT = records.next_token_weights(record, players)
  return -(loglik_BT * weights_BT).sum(), weights_BT.sum()


def heldout_loss(cfg: lm.Config, params: Any, source, players: Sequence[str | int],
                 seq_len: int, batch_size: int = 64) -> dict:
  """``{"heldout_loss", "heldout_perplexity", "heldout_tokens", "heldout_records"}`` of
  ``params`` on every record of ``source`` (anything with ``len`` and ``[i]`` giving ``tokens``
  and ``players``), scoring the tokens moved by ``players``."""
  ids = records.player_ids(players)
  n = len(source)
  nll, tokens = 0.0, 0.0
  for start in range(0, n, batch_size):
    cut = [(np.asarray(source[i]["tokens"], np.int32)[:seq_len],
            np.asarray(source[i]["players"], np.int32)[:seq_len])
           for i in range(start, min(start + batch_size, n))]
    batch = records.from_transcripts(cut, seq_len, batch_size)
    s, c = jax.device_get(_nll(cfg, params, batch, ids))
    nll, tokens = nll + float(s), tokens + float(c)
  loss = nll / tokens if tokens else math.nan
  return {"heldout_loss": loss, "heldout_perplexity": math.exp(loss) if tokens else math.nan,
          "heldout_tokens": int(tokens), "heldout_records": n}
