"""KV-cached decoding inside jit: one prefill, then ``lax.while_loop``s of one-token steps (runs
of ``DECODE_CACHE_BLOCK`` steps or more, each attending only the cache slots filled by its end).

Prompts are LEFT-padded to a common length ``P`` (pad id 0, segment 0), so every row's prompt
ends at slot ``P - 1`` and all rows write the same cache slot at each step. Row ``b``'s positions
start at 0 at its first real token. Generated tokens go into a preallocated ``[B, N]`` buffer;
after a row emits ``eos_id`` (or any of ``stop_ids``) its later tokens are PAD (0) with log-prob 0,
and the loop stops early once every row is done (when no stop id is in the vocabulary, it runs a
fixed ``N - 1`` steps). Sampling can be restricted with ``top_k`` and ``top_p`` (nucleus), applied
to ``logits / temperature`` (see ``top_k_logits``, ``top_p_logits``); a token is drawn by inverse
CDF from one uniform per row and step, all drawn before the loop (see ``_choose``).

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

from gamejax.models import kernels, lm
from gamejax.players.selfplay import is_mixture, mix_logprobs

PAD_ID = 0


def _init_cache(cfg: lm.Config, params, b: int, length: int):
  """The KV cache of ``params``: one model's, or a geometric mixture's two (``is_mixture``)."""
  if is_mixture(params):
    return tuple(lm.init_cache(cfg, b, length) for _ in range(2))
  return lm.init_cache(cfg, b, length)


def _decode_params(cfg: lm.Config, params):
  """``lm.decode_params`` of one model, or of each of a mixture's two."""
  if is_mixture(params):
    return {**params, **{k: lm.decode_params(cfg, params[k]) for k in ("mixture_a", "mixture_b")}}
  return lm.decode_params(cfg, params)


def _forward_cached(cfg: lm.Config, params, *inputs, last: bool = False, **ahead):
  """``lm.apply_with_cache``; ``last``: the logits of the last position only ``[B, 1, V]``, the
  LM head read there alone (a prefill needs no other: at a 128k vocabulary the head over every
  prompt position is a fifth of a 1B model's prefill FLOPs, and ``[B, P, V]`` floats)."""
  if not last:
    return lm.apply_with_cache(cfg, params, *inputs, **ahead)
  hidden_BTD, cache = lm.apply_with_cache(cfg, params, *inputs, hidden=True, **ahead)
  return lm.lm_head(cfg, params, hidden_BTD[:, -1:]), cache


def _apply_cached(cfg: lm.Config, params, tokens, positions, segments, cache, slot,
                  last: bool = False, **ahead):
  """``(logits, cache)`` of one model, or of the geometric mixture ``p_a^(1-beta) p_b^beta``
  (``selfplay.mixture``, Nash-MD's opponent) token by token: its normalised log-probs, from both
  models' forward passes over their own caches. ``ahead``: ``lm.apply_with_cache``'s ``rope``
  and ``bias``, computed before the decode loop; ``last``: the last position's only
  (``_forward_cached``)."""
  if not is_mixture(params):
    return _forward_cached(cfg, params, tokens, positions, segments, cache, slot, last=last,
                           **ahead)
  out = [_forward_cached(cfg, params[k], tokens, positions, segments, c, slot, last=last, **ahead)
         for k, c in zip(("mixture_a", "mixture_b"), cache)]
  logp = [jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1) for logits, _ in out]
  return mix_logprobs(logp[0], logp[1], params["beta"]), (out[0][1], out[1][1])


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


def _order_keys(x_BV):
  """``uint32`` keys in the order of the float32 values (``-0.0`` just below ``+0.0``)."""
  bits = jax.lax.bitcast_convert_type(x_BV.astype(jnp.float32), jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _from_order_key(key):
  bits = jnp.where(key >> 31 == 1, key & jnp.uint32(0x7FFFFFFF), ~key)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _largest_key_where(holds, rows: int):
  """Per row, the largest ``uint32`` key ``r`` for which ``holds(r)`` (``bool[rows]`` of keys
  ``[rows]``; true up to some key, false above it), found bit by bit from the top: 32 passes of
  ``holds`` (0 where it holds for no key above 0). XLA:CPU's sort (and ``lax.top_k``, a sort
  there) took 80-95 ms per decode step at 16 rows of 32,000 words; 32 passes of a compare and a
  sum take 2.5 ms."""
  def bit(i, r_B):
    candidate_B = r_B | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
    return jnp.where(holds(candidate_B), candidate_B, r_B)
  return jax.lax.fori_loop(0, 32, bit, jnp.zeros((rows,), jnp.uint32))


def top_k_logits(logits_BV, k: int):
  """Masks all but the ``k`` largest logits of each row to ``-inf`` (``k`` static; 0 = off).

  Ties with the ``k``-th largest value are all kept. ``k >= V`` keeps everything. The ``k``-th
  largest value is found without sorting: the largest key that at least ``k`` logits reach
  (``_largest_key_where``); it is ``lax.top_k``'s, bit for bit.

  >>> top_k_logits(jnp.array([[1.0, 3.0, 2.0]]), 2).tolist()
  [[-inf, 3.0, 2.0]]
  """
  if k < 0:
    raise ValueError(f"top_k must be >= 0; got {k}")
  if k == 0 or k >= logits_BV.shape[-1]:
    return logits_BV
  keys_BV = _order_keys(logits_BV)
  kth_B = _largest_key_where(lambda r_B: jnp.sum(keys_BV >= r_B[:, None], axis=-1) >= k,
                             logits_BV.shape[0])
  return jnp.where(logits_BV < _from_order_key(kth_B)[:, None], -jnp.inf, logits_BV)


def top_p_logits(logits_BV, p: float):
  """Nucleus filter: keeps, per row, the smallest set of most-likely tokens whose
  ``softmax(logits)`` mass reaches ``p`` (always at least the top token); masks the rest to
  ``-inf``. ``p`` is static, in ``(0, 1]``; 1.0 keeps everything. Ties with the last kept value
  are all kept.

  The last kept value is the largest ``v`` whose tokens at or above it hold mass ``p``, found
  without sorting (``_largest_key_where``: 32 masked sums of the probabilities). Where a set's
  mass is within float32 rounding of ``p`` the kept set may differ by that boundary's token from
  a running sum's over sorted probabilities (the sums add in other orders).

  >>> top_p_logits(jnp.log(jnp.array([[0.2, 0.5, 0.3]])), 0.7).tolist()[0][0]
  -inf
  """
  if not 0.0 < p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1]; got {p}")
  if p >= 1.0:
    return logits_BV
  keys_BV = _order_keys(logits_BV)
  probs_BV = jax.nn.softmax(logits_BV.astype(jnp.float32), axis=-1)
  last_B = _largest_key_where(
      lambda r_B: jnp.sum(jnp.where(keys_BV >= r_B[:, None], probs_BV, 0.0), axis=-1) >= p,
      logits_BV.shape[0])
  # key 0: not even every token holds mass p (rounding, p near 1): all are kept
  threshold_B = jnp.where(last_B == 0, -jnp.inf, _from_order_key(last_B))
  return jnp.where(logits_BV < threshold_B[:, None], -jnp.inf, logits_BV)


CDF_BLOCK = 128        # words per block of the two-level running sum (``_inverse_cdf``)
FLAT_CDF_WORDS = 1024  # up to this many words, one running sum over the whole vocabulary


def _inverse_cdf(weights_BV, uniform_B, block: int = CDF_BLOCK, flat_up_to: int = FLAT_CDF_WORDS):
  """Index drawn from each row's unnormalised non-negative ``weights`` with one ``uniform`` in
  ``(0, 1]`` per row: the first slot whose running sum reaches ``uniform * total``. Never a slot of
  weight 0 (the running sum is flat there), and never past the end (``uniform <= 1``).

  Above ``flat_up_to`` words the running sum is taken in two levels: over the totals of blocks of
  ``block`` words (which block the draw falls in), then within that one block. The flat running
  sum over the vocabulary was a decode step's slowest kernel at real vocabularies on CPU (XLA
  computes it as a reduce-window: 1.8 ms of a 5.6 ms step at 32,000 words and batch 16, 33 ms at
  64 rows of 128,256 words); the two levels are a reduction and two short running sums (0.17 and
  0.65 ms there). They add in another order, so where ``uniform * total`` lies within float
  rounding of a boundary they may draw its neighbour: about 1 draw in 100,000 at 320 words. That
  is why small vocabularies keep the flat sum: it costs little there (0.1 ms at 1,024 words), and
  the runs of the models with 320 words (the main job's, the benchmarks') stay the same bit for
  bit — with two levels the main job's GRPO stage draws another token by its 20th step."""
  b, v = weights_BV.shape
  if v <= flat_up_to:
    cdf_BV = jnp.cumsum(weights_BV, axis=-1)
    return jnp.sum(cdf_BV < uniform_B[:, None] * cdf_BV[:, -1:], axis=-1).astype(jnp.int32)
  n = -(-v // block)
  weights_BNL = jnp.pad(weights_BV, ((0, 0), (0, n * block - v))).reshape(b, n, block)
  cdf_BN = jnp.cumsum(weights_BNL.sum(axis=-1), axis=-1)
  threshold_B = uniform_B * cdf_BN[:, -1]
  # The first block whose running total reaches the threshold (<= n - 1: the last total does);
  # it has a positive weight, and the threshold is above the total before it.
  k_B = jnp.sum(cdf_BN < threshold_B[:, None], axis=-1)
  before_B = jnp.where(k_B > 0, jnp.take_along_axis(cdf_BN, jnp.maximum(k_B - 1, 0)[:, None],
                                                    axis=-1)[:, 0], 0.0)
  weights_BL = jnp.take_along_axis(weights_BNL, k_B[:, None, None], axis=1)[:, 0]
  inner_B = jnp.sum(jnp.cumsum(weights_BL, axis=-1) < (threshold_B - before_B)[:, None], axis=-1)
  # Rounding may leave the block's own running sum short of the threshold: its last positive slot.
  last_B = jnp.max(jnp.where(weights_BL > 0, jnp.arange(block), 0), axis=-1)
  return (k_B * block + jnp.minimum(inner_B, last_B)).astype(jnp.int32)


def _choose(logits_BV, uniform_B, temperature: float, top_k: int = 0, top_p: float = 1.0,
            scaled_logprobs: bool = False):
  """``(token_B, logprob_B)``: greedy at temperature 0, else a draw from ``softmax(logits /
  temperature)`` restricted to the ``top_k`` / ``top_p`` set (top-k first, then top-p over what
  it kept), by inverse CDF with ``uniform_B`` (one number in ``(0, 1]`` per row). ``logprob`` is
  ``log_softmax(logits)`` at the token, or with ``scaled_logprobs`` ``log_softmax(logits /
  temperature)`` (the tempered policy, unfiltered; temperature 0 scores at 1).

  One uniform per row rather than Gumbel noise over the whole vocabulary: the random numbers for
  every step are drawn before the decode loop, and a step does no PRNG work (on CPU each
  ``jax.random`` call in the loop is a small loop of its own; two of them cost more than this
  whole function).
  """
  max_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
  exp_BV = jnp.exp(logits_BV - max_B1)   # shared by the logprob and plain temperature-1 sampling
  if temperature == 0.0:
    token_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  elif temperature == 1.0 and top_k == 0 and top_p >= 1.0:
    token_B = _inverse_cdf(exp_BV, uniform_B)
  else:
    scaled_BV = top_p_logits(top_k_logits(logits_BV / temperature, top_k), top_p)
    token_B = _inverse_cdf(jnp.exp(scaled_BV - jnp.max(scaled_BV, axis=-1, keepdims=True)),
                           uniform_B)
  if scaled_logprobs and temperature not in (0.0, 1.0):
    logits_BV, max_B1 = logits_BV / temperature, max_B1 / temperature
    exp_BV = jnp.exp(logits_BV - max_B1)
  logit_B = jnp.take_along_axis(logits_BV, token_B[:, None], axis=-1)[:, 0]
  logprob_B = logit_B - max_B1[:, 0] - jnp.log(jnp.sum(exp_BV, axis=-1))
  return token_B, logprob_B


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


# The decode loop attends a cache that grows in runs of this many steps (``_runs``): a step
# reads the slots filled so far rounded up to the run's end, not the whole ``P + N - 1``; at most
# ``DECODE_MAX_RUNS`` runs (each is a loop XLA compiles), longer ones past that.
DECODE_CACHE_BLOCK = 64
DECODE_MAX_RUNS = 4


def _runs(n: int, block: int):
  """The decode loop's steps ``1 .. n - 1`` in runs of ``block`` or more, at most
  ``DECODE_MAX_RUNS`` of them (one run when ``block`` is 0): ``[(first step, step after the
  last)]``.

  >>> _runs(200, 64), _runs(64, 64), _runs(1, 64), _runs(100, 0)
  ([(1, 65), (65, 129), (129, 193), (193, 200)], [(1, 64)], [], [(1, 100)])
  >>> len(_runs(2000, 64)), _runs(2000, 64)[0]
  (4, (1, 501))
  """
  if block < 0:
    raise ValueError(f"generate needs cache_block >= 0; got {block}")
  steps = n - 1
  block = max(block, -(-steps // DECODE_MAX_RUNS)) if block else steps
  return [(i0, min(i0 + block, n)) for i0 in range(1, n, block)] if steps else []


def _grow_cache(cache, length: int):
  """``lm.grow_cache`` of one model's cache, or of each of a mixture's two."""
  if isinstance(cache, tuple):
    return tuple(lm.grow_cache(c, length) for c in cache)
  return lm.grow_cache(cache, length)


def _broadcast_cache(cache, group_size: int):
  """A cache of ``U`` rows as one of ``U * group_size``: row ``u``'s slots for each of its group
  (rows ``u * group_size ..``). Every family's cache has its rows on axis 0."""
  if group_size == 1:
    return cache
  return jax.tree.map(lambda c: jnp.repeat(c, group_size, axis=0), cache)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "eos_id",
                                             "top_k", "top_p", "stop_ids", "scaled_logprobs",
                                             "group_size", "cache_block"))
def generate(cfg: lm.Config, params, prompt_BP, prompt_lengths_B, max_new_tokens: int,
             rng, temperature: float = 0.0, eos_id: int = 2, *, top_k: int = 0,
             top_p: float = 1.0, stop_ids: tuple[int, ...] = (),
             scaled_logprobs: bool = False, group_size: int = 1,
             cache_block: int = DECODE_CACHE_BLOCK) -> dict:
  """Samples up to ``max_new_tokens`` (N) continuation tokens of left-padded prompts.

  Args:
    cfg: model config (static).
    params: model params (``lm.init_params``), or a geometric mixture of two models'
      (``selfplay.mixture``'s ``{"mixture_a", "mixture_b", "beta"}``), sampled token by token.
    prompt_BP: int32[U, P] prompts, left-padded with 0 (see ``left_pad``): the ``U`` distinct
      prompts, ``B = U * group_size`` rows of output (``U = B`` with the default group of 1).
    prompt_lengths_B: int32[U] number of real tokens per prompt, each in ``1..P``.
    max_new_tokens: N (static).
    rng: PRNG key; unused when ``temperature == 0``.
    temperature: 0 for greedy argmax, else sample from ``softmax(logits / temperature)`` (static).
    eos_id: the token that ends a row (static).
    top_k: if > 0, sample only among the ``top_k`` largest logits (static; ignored by greedy).
    top_p: if < 1, sample only from the nucleus of ``softmax(logits / temperature)`` (after
      ``top_k``) whose mass reaches ``top_p`` (static; ignored by greedy).
    stop_ids: further tokens that end a row, like ``eos_id`` (static tuple).
    scaled_logprobs: report ``log_softmax(logits / temperature)`` instead of temperature-1
      log-probs (static; the convention of RL scoring, see ``gamejax.players.policy``).
    group_size: G (static): each prompt is continued G times, rows ``u * G .. u * G + G - 1`` of
      the output continuing prompt ``u``. The prompt is prefilled once and its KV cache broadcast
      to the group: the same output as G copies of each prompt with ``group_size=1`` (the
      log-probs up to float32 rounding: on some CPUs XLA's GEMM rounds a row differently with
      the number of rows), at ``1 / G`` of the prefill's FLOPs.
    cache_block: the decode loop's steps go in runs of this many (static; at most
      ``DECODE_MAX_RUNS`` runs, longer ones past that; 0: one run), each attending a KV cache of
      the ``P - 1 + i`` slots filled by its last step ``i``, grown with empty slots between runs:
      the same tokens as one run over all ``P + N - 1`` slots, the log-probs up to float32
      rounding (the attention's sums skip empty slots), and on average about half the cache read
      per step when ``N`` is long against ``P``. The price: XLA compiles one loop per run, and
      growing the cache copies it, two caches alive for a moment (set 0 where the cache is most
      of the memory).

  Returns:
    ``{"tokens": int32[B, N], "lengths": int32[B], "logprobs": float32[B, N],
    "mask_BN": float32[B, N], "stopped_B": bool[B]}`` (``B`` = prompts x ``group_size``): tokens
    up to and including the first stop token (``eos_id`` or one of ``stop_ids``) then PAD; lengths count those tokens (N if no stop);
    logprobs are the model's ``log_softmax(logits)`` at the chosen tokens -- at temperature 1
    (``log_softmax(logits / temperature)`` with ``scaled_logprobs``) and unfiltered by
    ``top_k``/``top_p`` -- and 0 after the end; ``mask_BN`` is 1.0 on the ``lengths`` generated tokens, 0.0 after;
    ``stopped_B`` says whether the row emitted a stop token within its N tokens (False: it ran
    into the ``max_new_tokens`` limit). See the module docstring for an example.
  """
  _check_options("generate", max_new_tokens, temperature, top_k, top_p, stop_ids)
  if group_size < 1:
    raise ValueError(f"generate needs group_size >= 1; got {group_size}")
  u, p = prompt_BP.shape              # u distinct prompts, each continued group_size times
  b, n = u * group_size, max_new_tokens
  prompt_lengths_U = jnp.asarray(prompt_lengths_B, jnp.int32)
  slots_P = jnp.arange(p, dtype=jnp.int32)
  first_U = p - prompt_lengths_U  # slot of each row's first real token
  real_UP = slots_P[None, :] >= first_U[:, None]
  positions_UP = jnp.where(real_UP, slots_P[None, :] - first_U[:, None], 0)

  # The last sampled token is never fed back, so P + N - 1 slots suffice. Each distinct prompt
  # is prefilled once; its cache and last logits are then its group's.
  params = _decode_params(cfg, params)
  runs = _runs(n, cache_block)
  cache = _init_cache(cfg, params, u, p + (runs[0][1] if runs else 1) - 1)
  logits_U1V, cache = _apply_cached(
      cfg, params, jnp.asarray(prompt_BP, jnp.int32), positions_UP, real_UP.astype(jnp.int32),
      cache, 0, last=True)
  cache = _broadcast_cache(cache, group_size)
  last_BV = jnp.repeat(logits_U1V[:, -1], group_size, axis=0)
  prompt_lengths_B = jnp.repeat(prompt_lengths_U, group_size)

  # Every step's random numbers, drawn here in one go: a uniform in (0, 1] per row (see _choose).
  # Greedy decoding uses none.
  if temperature > 0.0:
    uniforms_NB = 1.0 - jax.random.uniform(rng, (n, b), jnp.float32)
  else:
    uniforms_NB = jnp.ones((n, b), jnp.float32)
  stops_S = jnp.asarray((eos_id,) + tuple(stop_ids), jnp.int32)
  # A stop id outside the vocabulary is never sampled; with no other, no row ends early and the
  # loop runs a fixed N - 1 steps without tracking which rows are done.
  can_stop = any(0 <= s < cfg.vocab_size for s in (eos_id,) + tuple(stop_ids))

  def emit(i, logits_BV, tokens_BN, logprobs_BN):
    token_B, logprob_B = _choose(logits_BV, uniforms_NB[i], temperature, top_k, top_p,
                                 scaled_logprobs)
    tokens_BN = jax.lax.dynamic_update_slice(tokens_BN, token_B[:, None], (0, i))
    logprobs_BN = jax.lax.dynamic_update_slice(logprobs_BN, logprob_B[:, None], (0, i))
    return token_B, tokens_BN, logprobs_BN

  def is_stop(tokens):
    return jnp.any(tokens[..., None] == stops_S.reshape((1,) * tokens.ndim + (-1,)), axis=-1)

  # What a decode step needs of its position, computed here for every step: token i - 1 goes in
  # at position length + i - 1 (its RoPE tables, ``rope_N``), at cache slot P - 1 + i, and it
  # sees its row's slots from the prompt's first real token to its own (``start_bias_BS``, cut
  # at the step's own slot in the loop: one compare, where the cached forward would write the
  # slot's segment id and compare the segments of all slots).
  positions_NB = prompt_lengths_B[None, :] + jnp.arange(n, dtype=jnp.int32)[:, None] - 1
  rope_N = lm.rope_tables(cfg, positions_NB)
  slots_S = jnp.arange(p + n - 1, dtype=jnp.int32)
  start_bias_BS = kernels.attention_bias(slots_S[None, :] >= (p - prompt_lengths_B)[:, None])

  def step(i, token_B, tokens_BN, logprobs_BN, cache, *, length):
    # Feed token i-1 (cache slot P - 1 + i, position length + i - 1), then choose token i. Rows
    # that have ended keep going; what they emit is masked out after the loop.
    slot = p - 1 + i
    bias_B1S = jnp.where(slots_S[:length] <= slot, start_bias_BS[:, :length],
                         kernels.attention_bias(False))[:, None]
    rope_B1 = None if rope_N is None else tuple(x[i][:, None] for x in rope_N)
    logits_B1V, cache = _apply_cached(
        cfg, params, token_B[:, None], positions_NB[i][:, None], jnp.ones((b, 1), jnp.int32),
        cache, slot, rope=rope_B1, bias=bias_B1S)
    token_B, tokens_BN, logprobs_BN = emit(i, logits_B1V[:, 0], tokens_BN, logprobs_BN)
    return token_B, tokens_BN, logprobs_BN, cache

  tokens_BN = jnp.full((b, n), PAD_ID, jnp.int32)
  logprobs_BN = jnp.zeros((b, n), jnp.float32)
  token_B, tokens_BN, logprobs_BN = emit(0, last_BV, tokens_BN, logprobs_BN)
  if can_stop:   # the early-exit loop's step counter and ended rows, carried across runs
    i, done_B = jnp.ones((), jnp.int32), is_stop(token_B)
  for i0, i1 in runs:
    # Steps i0 .. i1 - 1 attend a cache of P + i1 - 1 slots, the most any of them fills.
    length = p + i1 - 1
    cache = _grow_cache(cache, length)
    run_step = functools.partial(step, length=length)
    if can_stop:
      def cond(carry, i1=i1):
        i, _, done_B, *_ = carry
        return (i < i1) & ~jnp.all(done_B)

      def body(carry, run_step=run_step):
        i, token_B, done_B, *rest = carry
        token_B, *rest = run_step(i, token_B, *rest)
        return (i + 1, token_B, done_B | is_stop(token_B), *rest)

      i, token_B, done_B, tokens_BN, logprobs_BN, cache = jax.lax.while_loop(
          cond, body, (i, token_B, done_B, tokens_BN, logprobs_BN, cache))
    else:
      token_B, tokens_BN, logprobs_BN, cache = jax.lax.fori_loop(
          i0, i1, lambda i, carry, run_step=run_step: run_step(i, *carry),
          (token_B, tokens_BN, logprobs_BN, cache))

  # Each row ends at its first stop token; steps the loop skipped hold PAD, after every row ended.
  stop_BN = is_stop(tokens_BN)
  stopped_B = jnp.any(stop_BN, axis=-1)
  lengths_B = jnp.where(stopped_B, jnp.argmax(stop_BN, axis=-1) + 1, n).astype(jnp.int32)
  live_BN = jnp.arange(n, dtype=jnp.int32)[None, :] < lengths_B[:, None]
  return {"tokens": jnp.where(live_BN, tokens_BN, PAD_ID),
          "lengths": lengths_B,
          "logprobs": jnp.where(live_BN, logprobs_BN, 0.0),
          "mask_BN": live_BN.astype(jnp.float32),
          "stopped_B": stopped_B}


def make_generate(cfg: lm.Config, max_new_tokens: int, temperature: float = 0.0,
                  eos_id: int = 2, *, top_k: int = 0, top_p: float = 1.0,
                  stop_ids: Sequence[int] = (), scaled_logprobs: bool = False,
                  group_size: int = 1, cache_block: int = DECODE_CACHE_BLOCK):
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
                    stop_ids=stop_ids, scaled_logprobs=scaled_logprobs,
                    group_size=group_size, cache_block=cache_block)

  return fn
