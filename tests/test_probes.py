"""first_move_probe against an independent computation: the model run on each prompt alone, its
last position's softmax read by hand in NumPy."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gamejax import records
from gamejax.data.tokenizer import BOS, EOS, ByteTokenizer
from gamejax.models import llama
from gamejax.payoffs import Play, first_move_probe, weighted
from gamejax.players import policy

CFG = llama.LlamaConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64)
TOK = ByteTokenizer()
C, A, O = records.CHANCE, records.AGENT, records.OPPONENT


def _row(prompt: str, answer: str, seat: int):
  p, a = TOK.encode(prompt), TOK.encode(answer)
  tokens = np.array([BOS, *p, *a, EOS])
  players = np.array([O] * (1 + len(p)) + [seat] * (len(a) + 1))
  return tokens, players


def test_first_move_probe_is_the_policys_exact_mix_at_the_prompt():
  params = llama.init_params(CFG, jax.random.PRNGKey(3))
  params = jax.tree.map(lambda x: x * 4.0, params)       # a peaked, prompt-dependent policy
  temperature = 1.5
  apply = policy.at_temperature(functools.partial(llama.apply, CFG), temperature)
  rows = [("12+3=", "A7", A), ("40-9=", "C", A), ("7+7=", "B", O), ("12+3=", "x", A)]
  moves = jax.tree.map(jnp.asarray, records.from_transcripts(
      [_row(*r) for r in rows], seq_len=12))
  value, m = first_move_probe(moves=("A", "B", "C"), target=(0.3, 0.2, 0.5))(
      params, Play(apply, moves, {}, jax.random.PRNGKey(0)))
  assert float(value) == 0.0

  want = []
  for prompt, _, seat in rows:
    if seat != A:               # the opponent answered this row: no decision of the agent's
      continue
    ids = jnp.asarray([[BOS, *TOK.encode(prompt)]])
    out = llama.apply(CFG, params, ids, jnp.arange(ids.shape[1])[None], jnp.ones_like(ids))
    logits = np.asarray(out, np.float64)[0, -1] / temperature
    p = np.exp(logits - logits.max())
    p /= p.sum()
    want.append([p[TOK.encode(c)[0]] for c in "ABC"])
  assert not np.allclose(want[0], want[1], rtol=1e-2)   # the mix depends on the prompt
  want = np.mean(want, axis=0)
  got = np.array([float(m[f"p_{c}"]) for c in "ABC"])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(m["p_other"]), 1 - want.sum(), atol=1e-5)
  tv = 0.5 * (np.abs(want - [0.3, 0.2, 0.5]).sum() + 1 - want.sum())
  np.testing.assert_allclose(float(m["distance"]), tv, atol=1e-5)


def test_a_zero_weight_probe_adds_metrics_and_no_gradient():
  params = llama.init_params(CFG, jax.random.PRNGKey(1))
  apply = functools.partial(llama.apply, CFG)
  moves = jax.tree.map(jnp.asarray, records.from_transcripts([_row("1+1=", "B", A)], seq_len=8))
  play = Play(apply, moves, {}, jax.random.PRNGKey(0))
  payoff = weighted({"probe": (0.0, first_move_probe(moves=("A", "B", "C")))})
  grads, metrics = jax.grad(payoff, has_aux=True)(params, play)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
  assert {"probe/p_A", "probe/p_other"} <= set(metrics) and "probe/distance" not in metrics


@pytest.mark.parametrize("kwargs, message", [
    ({}, "give the moves as texts"),
    ({"moves": ("A", "BB")}, "each move must be one token"),
    ({"moves": ("A", "A")}, "distinct first moves"),
    ({"moves": ("A", "B"), "target": (0.5, 0.6)}, "expected a distribution"),
    ({"moves": ("A", "B"), "seat": "judge"}, "judge"),
])
def test_bad_probes_are_refused(kwargs, message):
  with pytest.raises((ValueError, KeyError), match=message):
    first_move_probe(**kwargs)
