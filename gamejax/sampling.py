"""KV-cached decoding inside jit: one prefill, then a ``lax.while_loop`` of one-token steps.

Prompts are LEFT-padded to a common length ``P`` (pad id 0, segment 0), so every row's prompt
ends at slot ``P - 1`` and all rows write the same cache slot at each step. Row ``b``'s positions
start at 0 at its first real token. Generated tokens go into a preallocated ``[B, N]`` buffer;
after a row emits ``eos_id`` (or any of ``stop_ids``) its later tokens are PAD (0) with log-prob 0,
and the loop stops early once every row is done. Sampling can be restricted with ``top_k`` and
``top_p`` (nucleus), applied to ``logits / temperature`` (see ``top_k_logits``, ``top_p_logits``).

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


def top_k_logits(logits_BV, k: int):
  """Masks all but the ``k`` largest logits of each row to ``-inf`` (``k`` static; 0 = off).

  Ties with the ``k``-th largest value are all kept. ``k >= V`` keeps everything.

  >>> top_k_logits(jnp.array([[1.0, 3.0, 2.0]]), 2).tolist()
  [[-inf, 3.0, 2.0]]
  """
  if k < 0:
    raise ValueError(f"top_k must be >= 0; got {k}")
  if k == 0 or k >= logits_BV.shape[-1]:
    return logits_BV
  kth_B1 = jax.lax.top_k(logits_BV, k)[0][..., -1:]
  return jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)


def top_p_logits(logits_BV, p: float):
  """Nucleus filter: keeps, per row, the smallest set of most-likely tokens whose
  ``softmax(logits)`` mass reaches ``p`` (always at least the top token); masks the rest to
  ``-inf``. ``p`` is static, in ``(0, 1]``; 1.0 keeps everything. Ties with the last kept value
  are all kept.

  >>> top_p_logits(jnp.log(jnp.array([[0.2, 0.5, 0.3]])), 0.7).tolist()[0][0]
  -inf
  """
  if not 0.0 < p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1]; got {p}")
  if p >= 1.0:
    return logits_BV
  sorted_BV = -jnp.sort(-logits_BV, axis=-1)  # descending
  probs_BV = jax.nn.softmax(sorted_BV.astype(jnp.float32), axis=-1)
  mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of strictly better tokens
  n_keep_B1 = jnp.maximum(jnp.sum(mass_before_BV < p, axis=-1, keepdims=True), 1)
  threshold_B1 = jnp.take_along_axis(sorted_BV, n_keep_B1 - 1, axis=-1)
  return jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)


def _choose(logits_BV, rng, temperature: float, top_k: int = 0, top_p: float = 1.0):
  """Greedy at temperature 0, else a categorical draw from ``logits / temperature`` restricted to
  the ``top_k`` / ``top_p`` set."""
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  scaled_BV = top_p_logits(top_k_logits(logits_BV / temperature, top_k), top_p)
  return jax.random.categorical(rng, scaled_BV, axis=-1).astype(jnp.int32)


def _check_options(name: str, max_new_tokens, temperature, top_k, top_p, stop_ids):
  if max_new_tokens < 1:
    raise ValueError(f"{name} needs max_new_tokens >= 1; got {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"{name} needs temperature >= 0; got {temperature}")
  if top_k < 0:
    raise ValueError(f"{name} needs top_k >= 0; got {top_k}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"{name} needs top_p in (0, 1]; got {top_p}")
  if not isinstance(stop_ids, tuple):
    raise ValueError(f"{name} needs stop_ids as a tuple of ints; got {stop_ids!r}")


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "eos_id",
                                             "top_k", "top_p", "stop_ids"))
def generate(cfg: llama.LlamaConfig, params, prompt_BP, prompt_lengths_B, max_new_tokens: int,
             rng, temperature: float = 0.0, eos_id: int = 2, *, top_k: int = 0,
             top_p: float = 1.0, stop_ids: tuple[int, ...] = ()) -> dict:
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
    top_k: if > 0, sample only among the ``top_k`` largest logits (static; ignored by greedy).
    top_p: if < 1, sample only from the nucleus of ``softmax(logits / temperature)`` (after
      ``top_k``) whose mass reaches ``top_p`` (static; ignored by greedy).
    stop_ids: further tokens that end a row, like ``eos_id`` (static tuple).

  Returns:
    ``{"tokens": int32[B, N], "lengths": int32[B], "logprobs": float32[B, N],
    "mask_BN": float32[B, N], "stopped_B": bool[B]}``: tokens up to and including the first stop
    token (``eos_id`` or one of ``stop_ids``) then PAD; lengths count those tokens (N if no stop);
    logprobs are the model's ``log_softmax(logits)`` at the chosen tokens -- always at temperature
    1 and unfiltered by ``top_k``/``top_p``, i.e. NOT the sampling distribution's log-prob -- and 0
    after the end; ``mask_BN`` is 1.0 on the ``lengths`` generated tokens, 0.0 after;
    ``stopped_B`` says whether the row emitted a stop token within its N tokens (False: it ran
    into the ``max_new_tokens`` limit). See the module docstring for an example.
  """
  _check_options("generate", max_new_tokens, temperature, top_k, top_p, stop_ids)
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

  stops_S = jnp.asarray((eos_id,) + tuple(stop_ids), jnp.int32)

  def emit(i, logits_BV, done_B, tokens_BN, logprobs_BN):
    token_B = _choose(logits_BV, jax.random.fold_in(rng, i), temperature, top_k, top_p)
    logprob_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV, axis=-1), token_B[:, None],
                                    axis=-1)[:, 0]
    token_B = jnp.where(done_B, PAD_ID, token_B)
    logprob_B = jnp.where(done_B, 0.0, logprob_B)
    tokens_BN = jax.lax.dynamic_update_slice(tokens_BN, token_B[:, None], (0, i))
    logprobs_BN = jax.lax.dynamic_update_slice(logprobs_BN, logprob_B[:, None], (0, i))
    lengths_inc_B = (~done_B).astype(jnp.int32)
    done_B = done_B | jnp.any(token_B[:, None] == stops_S[None, :], axis=-1)
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
  _, _, done_B, tokens_BN, logprobs_BN, lengths_B, _ = jax.lax.while_loop(cond, body, carry)
  mask_BN = (jnp.arange(n, dtype=jnp.int32)[None, :] < lengths_B[:, None]).astype(jnp.float32)
  return {"tokens": tokens_BN, "lengths": lengths_B, "logprobs": logprobs_BN,
          "mask_BN": mask_BN, "stopped_B": done_B}


def make_generate(cfg: llama.LlamaConfig, max_new_tokens: int, temperature: float = 0.0,
                  eos_id: int = 2, *, top_k: int = 0, top_p: float = 1.0,
                  stop_ids: Sequence[int] = ()):
  """``fn(params, prompt_BP, prompt_lengths_B, rng) -> generate(...)`` output, jitted once per
  input shape. The options are as in ``generate`` (``stop_ids`` may be any sequence of ints).

  >>> from gamejax.models import llama
  >>> cfg = llama.LlamaConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
  ...                         d_ff=32)
  >>> fn = make_generate(cfg, max_new_tokens=3)
  >>> params = llama.init_params(cfg, jax.random.key(0))
  >>> fn(params, np.array([[1, 5]], np.int32), np.array([2], np.int32),
  ...    jax.random.key(0))["tokens"].shape
  (1, 3)
  """
  stop_ids = tuple(int(s) for s in stop_ids)
  _check_options("make_generate", max_new_tokens, temperature, top_k, top_p, stop_ids)

  @jax.jit
  def fn(params, prompt_BP, prompt_lengths_B, rng):
    return generate(cfg, params, prompt_BP, prompt_lengths_B, max_new_tokens, rng,
                    temperature=temperature, eos_id=eos_id, top_k=top_k, top_p=top_p,
                    stop_ids=stop_ids)

  return fn
