"""Tests of gamejax.sampling: KV-cached generate vs. a naive loop over the full (uncached) forward."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gamejax import sampling
from gamejax.models import llama

CFG = llama.LlamaConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                        init_std=0.3)
N = 7
PROMPTS = [np.array([1, 9, 4, 17, 5]), np.array([1, 30]), np.array([1]), np.array([1, 9, 4])]
P = 5


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
  with jax.numpy_rank_promotion("raise"):
    yield


@pytest.fixture(scope="module")
def params():
  return llama.init_params(CFG, jax.random.key(0))


@functools.partial(jax.jit, static_argnums=0)
def _full_forward(cfg, params, tokens_BT, lengths_B):
  """Uncached forward on right-padded rows (one segment of ``lengths_B`` tokens each)."""
  slots = jnp.arange(tokens_BT.shape[1])[None, :]
  real = slots < lengths_B[:, None]
  return llama.apply(cfg, params, tokens_BT, jnp.where(real, slots, 0), real.astype(jnp.int32))


def _naive_greedy(params, prompts, n, eos_id):
  """Re-runs the full forward on the whole sequence for every new token; argmax; stop at eos."""
  out = []
  width = max(len(p) for p in prompts) + n
  for prompt in prompts:
    seq = list(prompt)
    new = []
    for _ in range(n):
      buf = np.zeros((1, width), np.int32)
      buf[0, :len(seq)] = seq
      logits = _full_forward(CFG, params, buf, np.array([len(seq)], np.int32))
      token = int(np.argmax(logits[0, len(seq) - 1]))
      seq.append(token)
      new.append(token)
      if token == eos_id:
        break
    out.append(new)
  return out


def _full_all_logprobs(params, prompts, tokens_BN, temperature=1.0):
  """``[B, N, V]``: log_softmax of the full forward (over ``temperature``) on prompt + generated
  tokens, at each generated slot."""
  width = P + N
  buf = np.zeros((len(prompts), width), np.int32)
  for b, prompt in enumerate(prompts):
    buf[b, :len(prompt)] = prompt
    buf[b, len(prompt):len(prompt) + N] = tokens_BN[b]
  logp = jax.nn.log_softmax(
      _full_forward(CFG, params, buf, np.full(len(prompts), width, np.int32)) / temperature,
      axis=-1)
  return np.stack([np.asarray(logp[b, len(p) - 1:len(p) - 1 + N]) for b, p in enumerate(prompts)])


def _full_logprobs(params, prompts, tokens_BN, temperature=1.0):
  """The full forward's log-probs (over ``temperature``) of the generated tokens."""
  logp = _full_all_logprobs(params, prompts, tokens_BN, temperature)
  return np.take_along_axis(logp, np.asarray(tokens_BN)[..., None], axis=-1)[..., 0]


def test_left_pad():
  prompt_BP, lengths_B = sampling.left_pad([np.array([4, 5]), np.array([6])], 3)
  np.testing.assert_array_equal(prompt_BP, [[0, 4, 5], [0, 0, 6]])
  np.testing.assert_array_equal(lengths_B, [2, 1])
  assert prompt_BP.dtype == np.int32 and lengths_B.dtype == np.int32
  with pytest.raises(ValueError, match="prompt 1 has 4 tokens"):
    sampling.left_pad([np.array([1]), np.array([1, 2, 3, 4])], 3)
  with pytest.raises(ValueError, match="prompt 0 has 0 tokens"):
    sampling.left_pad([np.array([], np.int32)], 3)


def test_greedy_matches_naive_uncached_loop(params):
  prompt_BP, lengths_B = sampling.left_pad(PROMPTS, P)
  out = sampling.generate(CFG, params, prompt_BP, lengths_B, N, jax.random.key(0), eos_id=-1)
  assert out["tokens"].dtype == jnp.int32 and out["tokens"].shape == (4, N)
  assert out["lengths"].dtype == jnp.int32 and out["logprobs"].dtype == jnp.float32
  want = np.array(_naive_greedy(params, PROMPTS, N, eos_id=-1))
  np.testing.assert_array_equal(out["tokens"], want)
  np.testing.assert_array_equal(out["lengths"], [N] * 4)
  assert len({tuple(r) for r in want.tolist()}) > 1   # rows really differ
  np.testing.assert_allclose(out["logprobs"], _full_logprobs(params, PROMPTS, want), atol=1e-4)


def test_eos_stops_rows_and_pads(params):
  prompt_BP, lengths_B = sampling.left_pad(PROMPTS, P)
  free = np.asarray(sampling.generate(CFG, params, prompt_BP, lengths_B, N, jax.random.key(0),
                                      eos_id=-1)["tokens"])
  eos = int(free[0, 2])   # a token row 0 emits at step 2 becomes the end token
  out = sampling.generate(CFG, params, prompt_BP, lengths_B, N, jax.random.key(0), eos_id=eos)
  want = _naive_greedy(params, PROMPTS, N, eos_id=eos)
  assert len(want[0]) <= 3 and want[0][-1] == eos
  tokens = np.asarray(out["tokens"])
  logprobs = np.asarray(out["logprobs"])
  for b, w in enumerate(want):
    assert out["lengths"][b] == len(w)
    np.testing.assert_array_equal(tokens[b, :len(w)], w)
    np.testing.assert_array_equal(tokens[b, len(w):], 0)
    np.testing.assert_array_equal(logprobs[b, len(w):], 0.0)
    assert np.all(logprobs[b, :len(w)] < 0)


def test_all_rows_done_early(params):
  prompt_BP, lengths_B = sampling.left_pad(PROMPTS, P)
  first = np.asarray(sampling.generate(CFG, params, prompt_BP, lengths_B, 1, jax.random.key(0),
                                       eos_id=-1)["tokens"])[:, 0]
  # Row 0's first token as eos: rows whose first token is it end after one step.
  out = sampling.generate(CFG, params, prompt_BP[first == first[0]], lengths_B[first == first[0]],
                          N, jax.random.key(0), eos_id=int(first[0]))
  np.testing.assert_array_equal(out["lengths"], 1)
  np.testing.assert_array_equal(out["tokens"][:, 1:], 0)


def test_sampled_logprobs_and_determinism(params):
  prompt_BP, lengths_B = sampling.left_pad(PROMPTS, P)
  fn = sampling.make_generate(CFG, N, temperature=1.5, eos_id=-1)
  a = fn(params, prompt_BP, lengths_B, jax.random.key(1))
  b = fn(params, prompt_BP, lengths_B, jax.random.key(1))
  c = fn(params, prompt_BP, lengths_B, jax.random.key(2))
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  assert not np.array_equal(a["tokens"], c["tokens"])
  tokens = np.asarray(c["tokens"])
  assert tokens.min() >= 0 and tokens.max() < CFG.vocab_size
  np.testing.assert_allclose(c["logprobs"], _full_logprobs(params, PROMPTS, tokens), atol=1e-4)
  cold = sampling.make_generate(CFG, N, temperature=1e-4, eos_id=-1)(
      params, prompt_BP, lengths_B, jax.random.key(3))
  greedy = sampling.generate(CFG, params, prompt_BP, lengths_B, N, jax.random.key(0), eos_id=-1)
  np.testing.assert_array_equal(cold["tokens"], greedy["tokens"])


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 0.8)])
def test_scaled_logprobs_are_the_tempered_policys(params, top_k, top_p):
  """``scaled_logprobs``: log_softmax(logits / temperature) at the drawn tokens (unfiltered), the
  policy the RL payoffs score; otherwise temperature-1 log-probs."""
  prompt_BP, lengths_B = sampling.left_pad(PROMPTS, P)
  options = dict(temperature=1.7, eos_id=-1, top_k=top_k, top_p=top_p)
  scaled = sampling.make_generate(CFG, N, scaled_logprobs=True, **options)(
      params, prompt_BP, lengths_B, jax.random.key(4))
  plain = sampling.make_generate(CFG, N, **options)(params, prompt_BP, lengths_B, jax.random.key(4))
  np.testing.assert_array_equal(scaled["tokens"], plain["tokens"])
  tokens = np.asarray(scaled["tokens"])
  want = _full_logprobs(params, PROMPTS, tokens, temperature=1.7)
  np.testing.assert_allclose(scaled["logprobs"], want, atol=1e-4)
  np.testing.assert_allclose(plain["logprobs"], _full_logprobs(params, PROMPTS, tokens), atol=1e-4)
  assert np.abs(want - _full_logprobs(params, PROMPTS, tokens)).max() > 0.05


def test_top_k_is_applied_before_top_p():
  """Probabilities .4 .3 .2 .1: top-k 2 keeps {0, 1} (then 4/7, 3/7) and top-p 0.5 of those keeps
  {0}. Top-p first would keep {0, 1} and top-k then both, drawing token 1 about 3/7 of the time."""
  rows = 2000
  logits_BV = jnp.log(jnp.tile(jnp.array([[0.4, 0.3, 0.2, 0.1]]), (rows, 1)))
  uniform_B = 1.0 - jax.random.uniform(jax.random.key(5), (rows,))
  choose = jax.jit(sampling._choose, static_argnums=(2, 3, 4))   # pylint: disable=protected-access
  tokens_B, _ = choose(logits_BV, uniform_B, 1.0, 2, 0.5)
  np.testing.assert_array_equal(np.unique(np.asarray(tokens_B)), [0])
  tokens_B, _ = choose(logits_BV, uniform_B, 1.0, 2, 0.8)         # both of the top-2 kept
  assert 0.35 < float(np.mean(np.asarray(tokens_B) == 1)) < 0.5


@pytest.mark.parametrize("temperature", [1.0, 2.0])   # 1.0: the unfiltered fast path
def test_first_token_distribution_follows_softmax_over_temperature(params, temperature):
  rows = 4000
  prompt_BP, lengths_B = sampling.left_pad([np.array([1, 9, 4])] * rows, 3)
  out = sampling.generate(CFG, params, prompt_BP, lengths_B, 1, jax.random.key(5),
                          temperature=temperature, eos_id=-1)
  logits = np.asarray(_full_forward(CFG, params, prompt_BP[:1], np.array([3], np.int32)))[0, -1]
  probs = np.exp(logits / temperature - np.max(logits / temperature))
  probs /= probs.sum()
  freq = np.bincount(np.asarray(out["tokens"])[:, 0], minlength=CFG.vocab_size) / rows
  # Each frequency within 5 standard errors of its probability.
  np.testing.assert_array_less(np.abs(freq - probs), 5 * np.sqrt(probs * (1 - probs) / rows) + 1e-3)


def test_traces_once_for_same_shapes(params):
  traces = []

  @jax.jit
  def counted(params, prompt_BP, lengths_B, rng):
    traces.append(1)
    return sampling.generate(CFG, params, prompt_BP, lengths_B, N, rng, temperature=0.7)

  fn = sampling.make_generate(CFG, N, temperature=0.7)
  for seed, prompts in enumerate([PROMPTS, PROMPTS[::-1]]):
    prompt_BP, lengths_B = sampling.left_pad(prompts, P)
    other = jax.tree_util.tree_map(lambda x: x * (1 + seed), params)
    counted(other, prompt_BP, lengths_B, jax.random.key(seed))
    fn(other, prompt_BP, lengths_B, jax.random.key(seed))
  assert len(traces) == 1
  assert fn._cache_size() == 1


def test_bad_arguments_raise(params):
  prompt_BP, lengths_B = sampling.left_pad(PROMPTS, P)
  with pytest.raises(ValueError, match="max_new_tokens"):
    sampling.make_generate(CFG, 0)
  with pytest.raises(ValueError, match="temperature"):
    sampling.generate(CFG, params, prompt_BP, lengths_B, N, jax.random.key(0), temperature=-1.0)


def _np_top_k(logits, k):
  if k == 0 or k >= logits.shape[-1]:
    return logits.copy()
  out = np.full_like(logits, -np.inf)
  for b, row in enumerate(logits):
    keep = np.argsort(-row)[:k]
    out[b, keep] = row[keep]
  return out


def _np_top_p(logits, p):
  out = np.full_like(logits, -np.inf)
  for b, row in enumerate(logits.astype(np.float64)):
    order = np.argsort(-row)
    probs = np.exp(row[order] - row[order[0]])
    probs /= probs.sum()
    keep, mass = [], 0.0
    for idx, prob in zip(order, probs):
      keep.append(idx)
      mass += prob
      if mass >= p:
        break
    out[b, keep] = logits[b, keep]
  return out


def test_top_k_and_top_p_logits_match_numpy():
  logits = np.asarray(jax.random.normal(jax.random.key(7), (6, 40)) * 2.0)
  for k in (0, 1, 3, 17, 40, 55):
    got = jax.jit(sampling.top_k_logits, static_argnums=1)(logits, k)
    np.testing.assert_array_equal(got, _np_top_k(logits, k))
  for p in (1.0, 0.9, 0.5, 0.2, 1e-6):
    got = np.asarray(jax.jit(sampling.top_p_logits, static_argnums=1)(logits, p))
    np.testing.assert_array_equal(got, _np_top_p(logits, p))
  tiny = np.asarray(sampling.top_p_logits(logits, 1e-6))
  np.testing.assert_array_equal(np.isfinite(tiny).sum(-1), 1)
  np.testing.assert_array_equal(np.argmax(tiny, -1), np.argmax(logits, -1))
  np.testing.assert_array_equal(sampling.top_p_logits(logits, 1.0), logits)
  with pytest.raises(ValueError, match="top_p"):
    sampling.top_p_logits(logits, 0.0)
  with pytest.raises(ValueError, match="top_k"):
    sampling.top_k_logits(logits, -1)


def test_top_k_and_top_p_without_sorting_keep_ties_signed_zeros_and_masked_words():
  """The filters find their threshold bit by bit over the floats' order, not by sorting: top-k's
  is the k-th largest value exactly (ties kept: NumPy's sorted row), top-p's the largest value
  whose tokens at or above it hold mass ``p`` (NumPy in float64, but where that mass lies within
  rounding of ``p``), on rows of 2,000 words with many ties, signed zeros, masked (-inf) words and
  a row that is all one value."""
  rng = np.random.default_rng(3)
  logits = np.round(rng.standard_normal((48, 2000)) * 3, 1).astype(np.float32)
  logits[0, :600], logits[0, 600:900] = 0.0, -0.0
  logits[1] = 1.5
  logits[2:10, ::3] = -np.inf
  for k in (1, 7, 50, 1999):
    got = np.asarray(jax.jit(sampling.top_k_logits, static_argnums=1)(logits, k))
    kth = -np.sort(-logits, axis=-1)[:, k - 1:k]
    np.testing.assert_array_equal(got, np.where(logits < kth, -np.inf, logits))
  for p in (0.9, 0.5, 0.05):
    got = np.asarray(jax.jit(sampling.top_p_logits, static_argnums=1)(logits, p))
    x = logits.astype(np.float64)
    probs = np.exp(x - x.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for row in range(len(x)):
      values = np.unique(x[row][np.isfinite(x[row])])[::-1]            # descending
      mass = np.array([probs[row][x[row] >= v].sum() for v in values])
      last = values[np.argmax(mass >= p)]
      want = np.where(x[row] < last, -np.inf, logits[row])
      if not np.array_equal(got[row], want):
        assert np.min(np.abs(mass - p)) < 1e-5, (p, row)
    assert np.isfinite(got).sum(-1).min() >= 1


def _chisquare_pvalue_ok(counts, expected):
  """True unless the counts reject ``expected`` at the 0.1% level."""
  try:
    from scipy import stats
  except ImportError:
    stats = None
  if stats is not None:
    return stats.chisquare(counts, expected).pvalue > 1e-3
  # By hand: the 99.9% quantile of chi-square with df degrees of freedom (Wilson-Hilferty).
  df = len(counts) - 1
  stat = np.sum((counts - expected) ** 2 / expected)
  return stat < df * (1 - 2 / (9 * df) + 3.090 * np.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("top_k,top_p", [(6, 1.0), (0, 0.7)])
def test_first_token_distribution_with_top_k_top_p(params, top_k, top_p):
  temperature, rows = 1.5, 3000
  prompt_BP, lengths_B = sampling.left_pad([np.array([1, 9, 4])] * rows, 3)
  out = sampling.generate(CFG, params, prompt_BP, lengths_B, 1, jax.random.key(11),
                          temperature=temperature, eos_id=-1, top_k=top_k, top_p=top_p)
  logits = np.asarray(_full_forward(CFG, params, prompt_BP[:1], np.array([3], np.int32)))[0, -1]
  scaled = (logits / temperature)[None].astype(np.float64)
  kept = np.isfinite(_np_top_p(_np_top_k(scaled, top_k), top_p))[0]
  assert 2 <= kept.sum() < CFG.vocab_size
  probs = np.where(kept, np.exp(scaled[0] - scaled.max()), 0.0)
  probs /= probs.sum()
  counts = np.bincount(np.asarray(out["tokens"])[:, 0], minlength=CFG.vocab_size)
  assert counts[~kept].sum() == 0
  expected = probs[kept] * rows
  assert expected.min() >= 5
  assert _chisquare_pvalue_ok(counts[kept], expected)


def test_stop_ids_end_rows(params):
  prompt_BP, lengths_B = sampling.left_pad(PROMPTS, P)
  free = np.asarray(sampling.generate(CFG, params, prompt_BP, lengths_B, N, jax.random.key(0),
                                      eos_id=-1)["tokens"])
  # A token of row 0 that some other row never emits, so that row runs to the limit.
  stop = next(int(t) for t in free[0] if any(t not in r for r in free[1:]))
  out = sampling.generate(CFG, params, prompt_BP, lengths_B, N, jax.random.key(0), eos_id=-1,
                          stop_ids=(CFG.vocab_size + 5, stop))
  want = _naive_greedy(params, PROMPTS, N, eos_id=stop)
  assert out["mask_BN"].dtype == jnp.float32 and out["stopped_B"].dtype == jnp.bool_
  tokens, mask = np.asarray(out["tokens"]), np.asarray(out["mask_BN"])
  stopped = np.asarray(out["stopped_B"])
  assert stopped.any() and not stopped.all()
  for b, w in enumerate(want):
    hit = stop in w
    assert stopped[b] == hit
    assert out["lengths"][b] == len(w) and (w[-1] == stop) == hit
    np.testing.assert_array_equal(tokens[b, :len(w)], w)
    np.testing.assert_array_equal(tokens[b, len(w):], 0)
    np.testing.assert_array_equal(mask[b], np.arange(N) < len(w))
    if not hit:
      np.testing.assert_array_equal(mask[b], 1.0)
      assert len(w) == N
  # eos_id behaves as one more stop id; with no stop at all nothing is marked stopped.
  as_eos = sampling.generate(CFG, params, prompt_BP, lengths_B, N, jax.random.key(0), eos_id=stop)
  for key in ("tokens", "lengths", "mask_BN", "stopped_B"):
    np.testing.assert_array_equal(as_eos[key], out[key])
  never = sampling.generate(CFG, params, prompt_BP, lengths_B, N, jax.random.key(0), eos_id=-1)
  assert not np.asarray(never["stopped_B"]).any()
  np.testing.assert_array_equal(never["mask_BN"], 1.0)


def test_cold_top_k_top_p_is_greedy(params):
  prompt_BP, lengths_B = sampling.left_pad(PROMPTS, P)
  greedy = sampling.generate(CFG, params, prompt_BP, lengths_B, N, jax.random.key(0), eos_id=-1)
  cold = sampling.make_generate(CFG, N, temperature=1e-6, eos_id=-1, top_k=4, top_p=0.8)(
      params, prompt_BP, lengths_B, jax.random.key(3))
  np.testing.assert_array_equal(cold["tokens"], greedy["tokens"])
  np.testing.assert_allclose(cold["logprobs"], greedy["logprobs"], atol=1e-5)


def test_traces_once_with_options(params):
  options = dict(temperature=0.9, eos_id=3, top_k=5, top_p=0.85, stop_ids=(4, 7))
  fn = sampling.make_generate(CFG, N, **{**options, "stop_ids": [4, 7]})
  sizes = []
  for seed, prompts in enumerate([PROMPTS, PROMPTS[::-1]]):
    prompt_BP, lengths_B = sampling.left_pad(prompts, P)
    other = jax.tree_util.tree_map(lambda x: x * (1 + seed), params)
    sampling.generate(CFG, other, prompt_BP, lengths_B, N, jax.random.key(seed), **options)
    sizes.append(sampling.generate._cache_size())
    fn(other, prompt_BP, lengths_B, jax.random.key(seed))
  assert sizes[0] == sizes[1]
  assert fn._cache_size() == 1
  with pytest.raises(ValueError, match="top_p"):
    sampling.make_generate(CFG, N, temperature=1.0, top_p=1.5)
  with pytest.raises(ValueError, match="top_k"):
    sampling.make_generate(CFG, N, temperature=1.0, top_k=-2)


@pytest.mark.parametrize("block,flat_up_to", [(128, 1024), (2, 0), (3, 4)])   # flat, two levels
def test_inverse_cdf_matches_numpy_and_never_draws_zero_weight(block, flat_up_to):
  weights = np.array([[0.0, 1.0, 0.0, 3.0, 0.0], [2.0, 0.0, 0.0, 0.0, 1e-30]], np.float32)
  uniforms = np.array([np.finfo(np.float32).tiny, 1e-7, 0.25, 0.2500001, 0.5, 0.999, 1.0],
                      np.float32)
  draw = jax.jit(sampling._inverse_cdf, static_argnums=(2, 3))
  got = np.stack([np.asarray(draw(weights, np.full(2, u, np.float32), block, flat_up_to))
                  for u in uniforms])
  cdf = np.cumsum(weights, axis=-1)
  # The first slot whose running sum reaches u * total.
  want = np.stack([[np.searchsorted(c, u * c[-1], side="left") for c in cdf] for u in uniforms])
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got[:, 0], [1, 1, 1, 3, 3, 3, 3])
  assert np.all(np.take_along_axis(weights, got.T, axis=-1) > 0)


def test_inverse_cdf_in_two_levels_draws_the_float64_running_sums_token():
  """Above ``FLAT_CDF_WORDS`` words the running sum is taken in two levels (blocks' totals, then
  within one block): each draw is NumPy's float64 inverse CDF's but where the threshold lies within
  float32 rounding of a boundary, and never a word of weight 0 or past the end, with most words
  masked out (a game's legal moves), with whole blocks of zeros, at ``uniform = 1``."""
  rng = np.random.default_rng(0)
  rows, v = 512, 2000                                  # 16 blocks of 128, the last one short
  assert sampling.FLAT_CDF_WORDS < v
  weights = rng.exponential(size=(rows, v)).astype(np.float32)
  weights[rows // 2:] *= rng.random((rows // 2, v)) < 0.02            # legal moves only
  weights[:, 300:900] *= np.arange(rows)[:, None] % 3 > 0            # blocks of zeros
  weights[np.arange(rows), rng.integers(0, v, rows)] += 1.0           # never all zero
  uniforms = (1.0 - rng.random(rows)).astype(np.float32)
  uniforms[::7] = 1.0
  got = np.asarray(jax.jit(sampling._inverse_cdf)(weights, uniforms))
  assert np.all((got >= 0) & (got < v))
  assert np.all(weights[np.arange(rows), got] > 0)
  cdf = np.cumsum(weights.astype(np.float64), axis=-1)
  threshold = uniforms * cdf[:, -1]
  want = np.array([np.searchsorted(c, t, side="left") for c, t in zip(cdf, threshold)])
  want = np.minimum(want, v - 1)
  near = np.array([np.min(np.abs(c - t)) for c, t in zip(cdf, threshold)]) < 1e-5 * cdf[:, -1]
  assert np.all((got == want) | near), np.flatnonzero((got != want) & ~near)
  assert (got == want).mean() > 0.9                   # (a boundary within rounding is rare)


def _pooled_chisquare_ok(counts, probs, rows):
  """Chi-square of ``counts`` against ``probs``, the bins expecting fewer than 5 pooled into one
  (itself merged into the smallest other bin if it still expects fewer than 5)."""
  expected = probs * rows
  big = expected >= 5
  counts_k, expected_k = counts[big].astype(np.float64), expected[big]
  pool_count, pool_expected = counts[~big].sum(), expected[~big].sum()
  if pool_expected >= 5:
    counts_k, expected_k = np.r_[counts_k, pool_count], np.r_[expected_k, pool_expected]
  else:
    smallest = np.argmin(expected_k)
    counts_k[smallest] += pool_count
    expected_k[smallest] += pool_expected
  return _chisquare_pvalue_ok(counts_k, expected_k)


def test_later_tokens_follow_the_model_given_earlier_ones(params):
  """Step 1 draws with its own random numbers: given the first token, the second follows the
  softmax of the full forward on prompt + first token."""
  rows, prompt = 6000, [1, 9, 4]
  prompt_BP, lengths_B = sampling.left_pad([np.array(prompt)] * rows, 3)
  tokens = np.asarray(sampling.make_generate(CFG, 2, temperature=1.0, eos_id=-1)(
      params, prompt_BP, lengths_B, jax.random.key(21))["tokens"])
  first = np.bincount(tokens[:, 0], minlength=CFG.vocab_size).argmax()
  second = tokens[tokens[:, 0] == first, 1]
  assert len(second) >= 500
  logits = np.asarray(_full_forward(CFG, params, np.array([prompt + [first]], np.int32),
                                    np.array([4], np.int32)))[0, -1].astype(np.float64)
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  counts = np.bincount(second, minlength=CFG.vocab_size)
  assert _pooled_chisquare_ok(counts, probs, len(second))


def test_fixed_length_and_early_exit_loops_agree(params):
  """With no stop id in the vocabulary the loop runs a fixed N - 1 steps; with one that is never
  drawn it may exit early but does not: both give the same tokens from the same key."""
  prompt_BP, lengths_B = sampling.left_pad(PROMPTS, P)
  fixed = sampling.generate(CFG, params, prompt_BP, lengths_B, N, jax.random.key(4),
                            temperature=1.5, eos_id=-1)
  unused = next(t for t in range(3, CFG.vocab_size) if t not in np.asarray(fixed["tokens"]))
  looped = sampling.generate(CFG, params, prompt_BP, lengths_B, N, jax.random.key(4),
                             temperature=1.5, eos_id=unused)
  for key in ("tokens", "lengths", "logprobs", "mask_BN", "stopped_B"):
    np.testing.assert_array_equal(looped[key], fixed[key])
  assert not np.asarray(looped["stopped_B"]).any()


def test_a_geometric_mixture_samples_token_by_token_from_both_models(params):
  """Nash-MD's opponent: each token from normalised ``(1 - beta) log p_a + beta log p_b`` given
  the text so far (both models run their own KV caches); beta 0 is model a itself."""
  from gamejax.players import selfplay
  other = llama.init_params(CFG, jax.random.key(7))
  prompt_BP, lengths_B = sampling.left_pad(PROMPTS, P)
  fn = sampling.make_generate(CFG, N, temperature=1.0, eos_id=-1)
  mix = lambda beta: selfplay.mixture("a", "b", beta).resolve({"a": params, "b": other}.get)
  out = fn(mix(0.3), prompt_BP, lengths_B, jax.random.key(4))
  tokens = np.asarray(out["tokens"])
  logp_a = _full_all_logprobs(params, PROMPTS, tokens)
  logp_b = _full_all_logprobs(other, PROMPTS, tokens)
  mixed = jax.nn.log_softmax(0.7 * logp_a + 0.3 * logp_b, axis=-1)
  want = np.take_along_axis(np.asarray(mixed), tokens[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(out["logprobs"], want, atol=1e-4)
  alone = fn(params, prompt_BP, lengths_B, jax.random.key(4))
  as_a = fn(mix(0.0), prompt_BP, lengths_B, jax.random.key(4))
  np.testing.assert_array_equal(as_a["tokens"], alone["tokens"])
  np.testing.assert_allclose(as_a["logprobs"], alone["logprobs"], atol=1e-5)
  assert not np.array_equal(tokens, np.asarray(alone["tokens"]))



@pytest.mark.parametrize("mixed", [False, True])
def test_a_group_shares_its_prompts_prefill_and_samples_what_copies_would(params, mixed):
  """``group_size=G``: each prompt prefilled once, its cache broadcast to its G rows; the same
  tokens, lengths and stops as G copies of every prompt, from the same key, and the same
  log-probs up to float32 rounding. (Bit for bit on some CPUs; on others XLA:CPU's GEMM rounds a
  row differently with the number of rows it multiplies, and the U prompts' prefill and the G * U
  copies' then differ by a few ulps.)"""
  from gamejax.players import selfplay
  g = 3
  if mixed:
    other = llama.init_params(CFG, jax.random.key(7))
    params = selfplay.mixture("a", "b", 0.4).resolve({"a": params, "b": other}.get)
  prompt_BP, lengths_B = sampling.left_pad(PROMPTS, P)
  options = dict(temperature=1.3, eos_id=3, top_k=20, stop_ids=(7,), scaled_logprobs=True)
  shared = sampling.generate(CFG, params, prompt_BP, lengths_B, N, jax.random.key(5),
                             group_size=g, **options)
  copies = sampling.generate(CFG, params, np.repeat(prompt_BP, g, axis=0),
                             np.repeat(lengths_B, g), N, jax.random.key(5), **options)
  for key in ("tokens", "lengths", "logprobs", "mask_BN", "stopped_B"):
    assert shared[key].shape[0] == len(PROMPTS) * g
    if key == "logprobs":
      np.testing.assert_allclose(shared[key], copies[key], rtol=1e-6, atol=1e-6)
    else:
      np.testing.assert_array_equal(shared[key], copies[key], key)
  # the group's rows differ from each other (they are samples, not one sample copied)
  tokens = np.asarray(shared["tokens"]).reshape(len(PROMPTS), g, N)
  assert any(len({tuple(r) for r in group}) > 1 for group in tokens)


def test_a_shared_prefill_costs_one_prompt_per_group(params):
  """The compiled sampler's FLOPs: with G = 4 the prefill (all but the decode loop) falls 4x."""
  prompt_BP, lengths_B = sampling.left_pad(PROMPTS, P)

  def flops(group_size, new_tokens):
    prompts = prompt_BP if group_size > 1 else np.repeat(prompt_BP, 4, axis=0)
    lengths = lengths_B if group_size > 1 else np.repeat(lengths_B, 4)
    fn = jax.jit(lambda p, t, l: sampling.generate(CFG, p, t, l, new_tokens, jax.random.key(0),
                                                   temperature=1.0, eos_id=-1,
                                                   group_size=group_size))
    return fn.lower(params, prompts, lengths).compile().cost_analysis()["flops"]

  # one new token: the prefill and the first choice, no decode step
  ratio = flops(1, 1) / flops(4, 1)
  assert 3.5 < ratio <= 4.0, ratio


def test_a_prefill_reads_the_lm_head_at_the_last_position_only():
  """At a vocabulary of 4,096 on a narrow model the LM head is most of a forward; the compiled
  prefill (one new token) costs less than the head over every prompt position alone, and holds
  less than a third of those logits (the last position's are a fifth). Its first choice is the full forward's (up to rounding)."""
  import dataclasses
  cfg = dataclasses.replace(CFG, vocab_size=4096)
  params = llama.init_params(cfg, jax.random.key(0))
  prompt_BP, lengths_B = sampling.left_pad(PROMPTS, P)
  fn = jax.jit(lambda p, t, l: sampling.generate(cfg, p, t, l, 1, jax.random.key(0),
                                                 temperature=0.0, eos_id=-1))
  compiled = fn.lower(params, prompt_BP, lengths_B).compile()
  head_everywhere = 2.0 * len(PROMPTS) * P * cfg.d_model * cfg.vocab_size
  assert compiled.cost_analysis()["flops"] < head_everywhere
  assert compiled.memory_analysis().temp_size_in_bytes < len(PROMPTS) * P * cfg.vocab_size * 4 / 3
  right_BP = np.zeros_like(prompt_BP)
  for r, prompt in enumerate(PROMPTS):
    right_BP[r, :len(prompt)] = prompt
  logits = _full_forward(cfg, params, right_BP, lengths_B)
  want = np.asarray([logits[r, n - 1].argmax() for r, n in enumerate(lengths_B)])
  np.testing.assert_array_equal(np.asarray(compiled(params, prompt_BP, lengths_B)["tokens"])[:, 0],
                                want)


def test_a_decode_step_runs_no_more_kernels_than_before():
  """The kernels XLA runs per decode step (``benchmarks.sample.decode_step_kernels``) on the
  benchmark's model, per layer and outside the layers: only ever lowered. Ceilings: 22 per layer
  (23.7 before the cache became head-major) and 23 for the embedding, LM head and sampling (28
  before RoPE's tables and the attention bias were computed ahead of the loop)."""
  import dataclasses
  from benchmarks import sample
  cfg = llama.LlamaConfig(vocab_size=320, d_model=256, d_ff=688, n_layers=1, n_heads=4,
                          n_kv_heads=2)
  one, three = (sample.decode_step_kernels(dataclasses.replace(cfg, n_layers=n), 16, 16, 64)
                for n in (1, 3))
  per_layer = (three - one) / 2
  assert per_layer <= 22, (one, three)
  assert one - per_layer <= 23, (one, three)


def _while_loop_cache_lengths(jaxpr, head_dim):
  """Per loop in ``jaxpr`` (``while``, or ``scan`` for a fixed-length ``fori_loop``; nested
  jaxprs included), the slot counts of the KV caches it carries: keys ``[B, G, K, S]`` and values
  ``[B, G, S, K]``, ``K = head_dim``."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("while", "scan"):
      shapes = [v.aval.shape for v in eqn.outvars if v.aval.ndim == 4]
      keys = {s[3] for s in shapes if s[2] == head_dim}
      values = {s[2] for s in shapes if s[3] == head_dim}
      found.append((sorted(keys), sorted(values)))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found += _while_loop_cache_lengths(sub.jaxpr, head_dim)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          found += _while_loop_cache_lengths(sub, head_dim)
  return found


# stops: the loop that exits early (else the fixed-length one); a mixture carries two caches
@pytest.mark.parametrize("model, stops, groups", [("llama", True, (1, 2)), ("mixture", False, (2,))])
def test_the_decode_loop_attends_a_cache_grown_in_runs(params, model, stops, groups):
  """``cache_block=2``: steps 1..6 of N = 7 in three runs of two, each attending a cache of the
  slots filled by its end (P + 2, P + 4, P + 6: the loops carry those, not P + N - 1), grown
  between runs (``lm.grow_cache``: every family's cache has Llama's layout). The same tokens, lengths and stops as one run over the whole cache
  (``cache_block=0``) from the same key, and the same log-probs up to float32 rounding (the
  attention's sums run over fewer empty slots)."""
  from gamejax.players import selfplay
  cfg = CFG
  if model == "mixture":
    other = llama.init_params(CFG, jax.random.key(7))
    params = selfplay.mixture("a", "b", 0.4).resolve({"a": params, "b": other}.get)
  prompt_BP, lengths_B = sampling.left_pad(PROMPTS, P)
  run = lambda block, g, eos_id=-1: sampling.generate(
      cfg, params, prompt_BP, lengths_B, N, jax.random.key(6), temperature=1.2, eos_id=eos_id,
      group_size=g, cache_block=block)
  if stops:   # the first row's fourth token ends rows: it stops in the second run
    run = functools.partial(run, eos_id=int(np.asarray(run(0, 1)["tokens"])[0, 3]))
  for g in groups:
    grown, whole = run(2, g), run(0, g)
    for key in ("tokens", "lengths", "mask_BN", "stopped_B"):
      np.testing.assert_array_equal(grown[key], whole[key], key)
    np.testing.assert_allclose(grown["logprobs"], whole["logprobs"], rtol=1e-6, atol=1e-6)
  if stops:
    assert np.asarray(grown["lengths"]).min() <= 4
  head_dim = cfg.d_model // cfg.n_heads
  lengths_of = lambda block: _while_loop_cache_lengths(jax.make_jaxpr(
      lambda: run(block, 2))().jaxpr, head_dim)
  assert lengths_of(2) == [([P + 2], [P + 2]), ([P + 4], [P + 4]), ([P + 6], [P + 6])]
  assert lengths_of(0) == [([P + N - 1], [P + N - 1])]
  # the default runs at most DECODE_MAX_RUNS loops: 64 steps or fewer in one
  assert sampling._runs(N, sampling.DECODE_CACHE_BLOCK) == [(1, N)]
