"""KV-cached decoding inside jit: one prefill, then a ``lax.while_loop`` of one-token steps.

Prompts are LEFT-padded to a common length ``P`` (pad id 0, segment 0), so every row's prompt
ends at slot ``P - 1`` and all rows write the same cache slot at each step. Row ``b``'s positions
start at 0 at its first real token. Generated tokens go into a preallocated ``[B, N]`` buffer;
after a row emits ``eos_id`` its later tokens are PAD (0) with log-prob 0, and the loop stops
early once every row is done.

>>> import jax, numpy as np
>>> from gamejax.models import llama
>>> cfg = llama.LlamaConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
...                         d_ff=32)
>>> params = llama.init_params(cfg, jax.random.key(0))
>>> prompt_BP, lengths_B = left_pad([np.array([1, 5, 6]), np.array([1, 7])], 4)
>>> prompt_BP.tolist(), lengths_B.tolist()
([[0, 1, 5, 6], [0, 0, 1, 7]], [3, 2])
>>> out = generate(cfg, params, prompt_BP, lengths_B, 5, jax.random.key(1))
>>> out["tokens"].shape, out["lengths"].shape, out["logprobs"].dtype
((2, 5), (2,), dtype('float32'))
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gamejax.models import llama

PAD_ID = 0


def left_pad(prompts: Sequence[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads 1-D token arrays to ``length`` with 0: ``(int32[B, length], int32[B] lengths)``.

  >>> left_pad([np.array([4, 5]), np.array([6])], 3)[0].tolist()
  [[0, 4, 5], [0, 0, 6]]
  """
  if length < 1:
    raise ValueError(f"left_pad needs length >= 1; got {length}")
  if not len(prompts):
    raise ValueError("left_pad got no prompts")
  out = np.zeros((len(prompts), length), np.int32)
  lengths = np.zeros((len(prompts),), np.int32)
  for row, prompt in enumerate(prompts):
    prompt = np.asarray(prompt)
    if prompt.ndim != 1:
      raise ValueError(f"prompt {row} must be a 1-D token array; got shape {prompt.shape}")
    if not 1 <= len(prompt) <= length:
      raise ValueError(f"prompt {row} has {len(prompt)} tokens; need 1 to {length}")
    out[row, length - len(prompt):] = prompt
    lengths[row] = len(prompt)
  return out, lengths


def _choose(logits_BV, rng, temperature: float):
  """Greedy at temperature 0, else a categorical draw from ``logits / temperature``."""
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, logits_BV / temperature, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "eos_id"))
def generate(cfg: llama.LlamaConfig, params, prompt_BP, prompt_lengths_B, max_new_tokens: int,
             rng, temperature: float = 0.0, eos_id: int = 2) -> dict:
  """Samples up to ``max_new_tokens`` (N) continuation tokens of left-padded prompts.

  Args:
    cfg: model config (static).
    params: model params (``llama.init_params``).
    prompt_BP: int32[B, P] prompts, left-padded with 0 (see ``left_pad``).
    prompt_lengths_B: int32[B] number of real tokens per row, each in ``1..P``.
    max_new_tokens: N (static).
    rng: PRNG key; unused when ``temperature == 0``.
    temperature: 0 for greedy argmax, else sample from ``softmax(logits / temperature)`` (static).
    eos_id: the token that ends a row (static).

  Returns:
    ``{"tokens": int32[B, N], "lengths": int32[B], "logprobs": float32[B, N]}``: tokens up to and
    including the first ``eos_id`` then PAD; lengths count those tokens (N if no eos); logprobs
    are the model's ``log_softmax(logits)`` (temperature 1) at the chosen tokens, 0 after the end.
    See the module docstring for an example.
  """
  if max_new_tokens < 1:
    raise ValueError(f"generate needs max_new_tokens >= 1; got {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"generate needs temperature >= 0; got {temperature}")
  b, p = prompt_BP.shape
  n = max_new_tokens
  prompt_lengths_B = jnp.asarray(prompt_lengths_B, jnp.int32)
  slots_P = jnp.arange(p, dtype=jnp.int32)
  first_B = p - prompt_lengths_B  # slot of each row's first real token
  real_BP = slots_P[None, :] >= first_B[:, None]
  positions_BP = jnp.where(real_BP, slots_P[None, :] - first_B[:, None], 0)
  segments_BP = real_BP.astype(jnp.int32)

  # The last sampled token is never fed back, so P + N - 1 slots suffice.
  cache = llama.init_cache(cfg, b, p + n - 1)
  logits_BPV, cache = llama.apply_with_cache(
      cfg, params, jnp.asarray(prompt_BP, jnp.int32), positions_BP, segments_BP, cache, 0)

  def emit(i, logits_BV, done_B, tokens_BN, logprobs_BN):
    token_B = _choose(logits_BV, jax.random.fold_in(rng, i), temperature)
    logprob_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV, axis=-1), token_B[:, None],
                                    axis=-1)[:, 0]
    token_B = jnp.where(done_B, PAD_ID, token_B)
    logprob_B = jnp.where(done_B, 0.0, logprob_B)
    tokens_BN = jax.lax.dynamic_update_slice(tokens_BN, token_B[:, None], (0, i))
    logprobs_BN = jax.lax.dynamic_update_slice(logprobs_BN, logprob_B[:, None], (0, i))
    lengths_inc_B = (~done_B).astype(jnp.int32)
    done_B = done_B | (token_B == eos_id)
    return token_B, done_B, tokens_BN, logprobs_BN, lengths_inc_B

  tokens_BN = jnp.full((b, n), PAD_ID, jnp.int32)
  logprobs_BN = jnp.zeros((b, n), jnp.float32)
  done_B = jnp.zeros((b,), bool)
  token_B, done_B, tokens_BN, logprobs_BN, lengths_B = emit(
      0, logits_BPV[:, -1], done_B, tokens_BN, logprobs_BN)

  def cond(carry):
    i, _, done_B, *_ = carry
    return (i < n) & ~jnp.all(done_B)

  def body(carry):
    i, token_B, done_B, tokens_BN, logprobs_BN, lengths_B, cache = carry
    # Feed token i-1 (cache slot P - 1 + i, position length + i - 1), then choose token i.
    position_B1 = (prompt_lengths_B + i - 1)[:, None]
    logits_B1V, cache = llama.apply_with_cache(
        cfg, params, token_B[:, None], position_B1, jnp.ones((b, 1), jnp.int32), cache,
        p - 1 + i)
    token_B, done_B, tokens_BN, logprobs_BN, inc_B = emit(
        i, logits_B1V[:, 0], done_B, tokens_BN, logprobs_BN)
    return i + 1, token_B, done_B, tokens_BN, logprobs_BN, lengths_B + inc_B, cache

  carry = (jnp.ones((), jnp.int32), token_B, done_B, tokens_BN, logprobs_BN, lengths_B, cache)
  _, _, _, tokens_BN, logprobs_BN, lengths_B, _ = jax.lax.while_loop(cond, body, carry)
  return {"tokens": tokens_BN, "lengths": lengths_B, "logprobs": logprobs_BN}


def make_generate(cfg: llama.LlamaConfig, max_new_tokens: int, temperature: float = 0.0,
                  eos_id: int = 2):
  """``fn(params, prompt_BP, prompt_lengths_B, rng) -> generate(...)`` output, jitted once per
  input shape.

  >>> from gamejax.models import llama
  >>> cfg = llama.LlamaConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
  ...                         d_ff=32)
  >>> fn = make_generate(cfg, max_new_tokens=3)
  >>> params = llama.init_params(cfg, jax.random.key(0))
  >>> fn(params, np.array([[1, 5]], np.int32), np.array([2], np.int32),
  ...    jax.random.key(0))["tokens"].shape
  (1, 3)
  """
  if max_new_tokens < 1:
    raise ValueError(f"make_generate needs max_new_tokens >= 1; got {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"make_generate needs temperature >= 0; got {temperature}")

  @jax.jit
  def fn(params, prompt_BP, prompt_lengths_B, rng):
    return generate(cfg, params, prompt_BP, prompt_lengths_B, max_new_tokens, rng,
                    temperature=temperature, eos_id=eos_id)

  return fn
