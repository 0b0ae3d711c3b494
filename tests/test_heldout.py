"""Held-out loss and perplexity against a NumPy reference over the same records."""
import jax
import numpy as np
import pytest

from gamejax import records
from gamejax.evaluation import heldout
from gamejax.models import llama

CFG = llama.LlamaConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=48,
                        init_std=0.3)


@jax.jit
def _forward(params, tokens, positions, segments):
  return llama.apply(CFG, params, tokens, positions, segments)


def _np_nll(params, source, who, seq_len):
  """Sum of -log softmax(logits)[next] over tokens moved by ``who``, one record at a time."""
  total, count = 0.0, 0
  for ex in source:
    tokens = np.asarray(ex["tokens"])[:seq_len]
    players = np.asarray(ex["players"])[:seq_len]
    n = len(tokens)
    logits = np.asarray(_forward(params, tokens[None], np.arange(n)[None],
                                 np.ones((1, n), np.int32)))[0].astype(np.float64)
    for t in range(n - 1):
      if players[t + 1] in who:
        row = logits[t] - logits[t].max()
        total -= row[tokens[t + 1]] - np.log(np.exp(row).sum())
        count += 1
  return total, count


@pytest.mark.parametrize("who", [("agent",), ("agent", "opponent")])
def test_heldout_loss_matches_numpy(who):
  rng = np.random.default_rng(0)
  source = []
  for _ in range(11):                 # 11 records in batches of 4: a padded last batch
    n_prompt, n_answer = rng.integers(1, 6), rng.integers(1, 9)
    source.append({"tokens": rng.integers(3, 40, n_prompt + n_answer),
                   "players": np.array([records.OPPONENT] * n_prompt + [records.AGENT] * n_answer)})
  params = llama.init_params(CFG, jax.random.key(0))
  out = heldout.heldout_loss(CFG, params, source, who, seq_len=10, batch_size=4)
  total, count = _np_nll(params, source, records.player_ids(who), 10)
  assert out["heldout_tokens"] == count and out["heldout_records"] == 11
  np.testing.assert_allclose(out["heldout_loss"], total / count, rtol=1e-5)
  np.testing.assert_allclose(out["heldout_perplexity"], np.exp(total / count), rtol=1e-5)
