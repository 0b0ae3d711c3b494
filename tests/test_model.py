"""Tests of gamejax.models.llama against an independent NumPy reference (and HF Llama if present)."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gamejax.models import kernels, llama

CFG = llama.LlamaConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                        rope_theta=500.0, init_std=0.2)


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
  with jax.numpy_rank_promotion("raise"):
    yield


def _random_params(cfg, seed=0):
  """Initial params with the RMSNorm scales also randomised, so every weight matters."""
  params = llama.init_params(cfg, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  def perturb(path, x):
    if path[-1].key == "scale":
      return jnp.asarray(1.0 + 0.3 * rng.standard_normal(x.shape), x.dtype)
    return x
  return jax.tree_util.tree_map_with_path(perturb, params)


# ----------------------------------------------------------------------------------------------
# Independent NumPy reference, written from the Llama formulas (float64).

def _np_rmsnorm(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _np_rope(x_THK, pos_T, theta):
  k = x_THK.shape[-1]
  inv_freq = 1.0 / theta ** (np.arange(0, k, 2) / k)
  ang = pos_T[:, None] * inv_freq[None]                       # [T, K/2]
  cos = np.cos(np.concatenate([ang, ang], -1))[:, None, :]
  sin = np.sin(np.concatenate([ang, ang], -1))[:, None, :]
  rot = np.concatenate([-x_THK[..., k // 2:], x_THK[..., :k // 2]], -1)
  return x_THK * cos + rot * sin


def _np_forward_row(cfg, p, tokens_T, pos_T, seg_T):
  """One row: logits [T, V]; a query attends keys <= it in its own (non-zero) segment. Reads
  the standard layout (``wq``, ``wk``, ``wv``, ``w_gate``, ``w_up``) of the stored params."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), llama.unfuse(cfg, p))
  t = len(tokens_T)
  h, kv, k = cfg.n_heads, cfg.n_kv_heads, cfg.d_model // cfg.n_heads
  x = p["embedding"][tokens_T]
  allowed = (np.tril(np.ones((t, t), bool)) & (seg_T[:, None] == seg_T[None, :])
             & (seg_T[:, None] > 0)) | np.eye(t, dtype=bool)
  for i in range(cfg.n_layers):
    b = p[f"block_{i}"]
    a = b["attn"]
    y = _np_rmsnorm(x, b["attn_norm"]["scale"], cfg.norm_eps)
    q = _np_rope((y @ a["wq"].reshape(cfg.d_model, h * k)).reshape(t, h, k), pos_T, cfg.rope_theta)
    kk = _np_rope((y @ a["wk"].reshape(cfg.d_model, kv * k)).reshape(t, kv, k), pos_T,
                  cfg.rope_theta)
    v = (y @ a["wv"].reshape(cfg.d_model, kv * k)).reshape(t, kv, k)
    kk = np.repeat(kk, h // kv, axis=1)                          # GQA: repeat each kv head
    v = np.repeat(v, h // kv, axis=1)
    heads = []
    for j in range(h):
      s = q[:, j] @ kk[:, j].T / np.sqrt(k)
      s = np.where(allowed, s, -np.inf)
      w = np.exp(s - s.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      heads.append(w @ v[:, j])
    x = x + np.concatenate(heads, -1) @ a["wo"].reshape(h * k, cfg.d_model)
    m = b["mlp"]
    y = _np_rmsnorm(x, b["mlp_norm"]["scale"], cfg.norm_eps)
    g = y @ m["w_gate"]
    x = x + ((g / (1 + np.exp(-g))) * (y @ m["w_up"])) @ m["w_down"]
  x = _np_rmsnorm(x, p["final_norm"]["scale"], cfg.norm_eps)
  head = p["embedding"].T if cfg.tie_embeddings else p["lm_head"]
  return x @ head


def _np_forward(cfg, params, tokens, positions, segments):
  return np.stack([_np_forward_row(cfg, params, *row) for row in zip(
      np.asarray(tokens), np.asarray(positions, np.float64), np.asarray(segments))])


@functools.partial(jax.jit, static_argnums=0)
def _jit_apply(cfg, params, tokens, positions, segments):
  return llama.apply(cfg, params, tokens, positions, segments)


def _single(tokens):
  tokens = np.asarray(tokens, np.int32)[None]
  return tokens, np.arange(tokens.shape[1], dtype=np.int32)[None], np.ones_like(tokens)


# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [True, False])
def test_forward_matches_numpy_reference(tie):
  cfg = llama.LlamaConfig(**{**CFG.__dict__, "tie_embeddings": tie})
  params = _random_params(cfg)
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
  positions = np.stack([np.arange(9), np.arange(9) + 5]).astype(np.int32)  # an offset start too
  segments = np.ones_like(tokens)
  got = _jit_apply(cfg, params, tokens, positions, segments)
  assert got.dtype == jnp.float32 and got.shape == (2, 9, cfg.vocab_size)
  want = _np_forward(cfg, params, tokens, positions, segments)
  assert np.abs(want).max() > 0.5  # the comparison is not between near-zero logits
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_packed_padded_rows_match_reference_and_separate_runs():
  params = _random_params(CFG)
  rng = np.random.default_rng(2)
  a = rng.integers(3, CFG.vocab_size, 5)
  b = rng.integers(3, CFG.vocab_size, 4)
  # Row 0: a then b packed, then 3 padding slots. Row 1: only padding then b (padding in front).
  tokens = np.array([np.r_[a, b, 0, 0, 0], np.r_[np.zeros(8), b]], np.int32)
  positions = np.array([np.r_[np.arange(5), np.arange(4), 0, 0, 0],
                        np.r_[np.zeros(8), np.arange(4)]], np.int32)
  segments = np.array([[1] * 5 + [2] * 4 + [0] * 3, [0] * 8 + [1] * 4], np.int32)
  got = np.asarray(_jit_apply(CFG, params, tokens, positions, segments))
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, _np_forward(CFG, params, tokens, positions, segments),
                             atol=1e-4, rtol=1e-4)
  alone_a = _jit_apply(CFG, params, *_single(a))[0]
  alone_b = _jit_apply(CFG, params, *_single(b))[0]
  np.testing.assert_allclose(got[0, :5], alone_a, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got[0, 5:9], alone_b, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got[1, 8:], alone_b, atol=1e-5, rtol=1e-5)


def test_library_attention_matches_the_numpy_reference_and_gamejax_gradients():
  """``attention="dot_product_attention"`` (``jax.nn.dot_product_attention``, JAX's autodiff) on
  packed and padded rows: the NumPy forward, and the gradients of the hand-written backward."""
  cfg = llama.LlamaConfig(**{**CFG.__dict__, "attention": "dot_product_attention"})
  params = _random_params(CFG)
  rng = np.random.default_rng(2)
  a, b = rng.integers(3, CFG.vocab_size, 5), rng.integers(3, CFG.vocab_size, 4)
  tokens = np.array([np.r_[a, b, 0, 0, 0], np.r_[np.zeros(8), b]], np.int32)
  positions = np.array([np.r_[np.arange(5), np.arange(4), 0, 0, 0],
                        np.r_[np.zeros(8), np.arange(4)]], np.int32)
  segments = np.array([[1] * 5 + [2] * 4 + [0] * 3, [0] * 8 + [1] * 4], np.int32)
  got = np.asarray(_jit_apply(cfg, params, tokens, positions, segments))
  np.testing.assert_allclose(got, _np_forward(CFG, params, tokens, positions, segments),
                             atol=1e-4, rtol=1e-4)
  real = segments > 0

  def loss(c, p):
    logits = llama.apply(c, p, tokens, positions, segments)
    return (jnp.sin(logits) * real[..., None]).sum()

  grads = [jax.jit(jax.grad(functools.partial(loss, c)))(params) for c in (cfg, CFG)]
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-5, rtol=1e-4), *grads)


def test_kv_cache_prefill_chunks_and_decode_match_full_forward():
  params = _random_params(CFG)
  rng = np.random.default_rng(3)
  tokens = rng.integers(3, CFG.vocab_size, (2, 10)).astype(np.int32)
  # Row 1 is left-padded by 2 (segment 0, positions start at its first real token).
  segments = np.array([[1] * 10, [0, 0] + [1] * 8], np.int32)
  positions = np.array([np.arange(10), np.r_[0, 0, np.arange(8)]], np.int32)
  full = np.asarray(_jit_apply(CFG, params, tokens, positions, segments))

  step = jax.jit(functools.partial(llama.apply_with_cache, CFG))
  cache = llama.init_cache(CFG, batch=2, max_len=12)   # longer than used: empty slots ignored
  got = []
  for start, stop in [(0, 4), (4, 7), (7, 8), (8, 9), (9, 10)]:   # prefill, chunk, then T=1
    sl = slice(start, stop)
    logits, cache = step(params, tokens[:, sl], positions[:, sl], segments[:, sl], cache,
                         jnp.int32(start))
    got.append(np.asarray(logits))
  got = np.concatenate(got, axis=1)
  np.testing.assert_allclose(got[0], full[0], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got[1, 2:], full[1, 2:], atol=1e-5, rtol=1e-5)
  assert np.isfinite(got).all()
  np.testing.assert_array_equal(cache["segment_ids"], np.c_[segments, np.zeros((2, 2))])
  assert cache["layers"][0]["k"].shape == (2, CFG.n_kv_heads, CFG.head_dim, 12)
  assert cache["layers"][0]["v"].shape == (2, CFG.n_kv_heads, 12, CFG.head_dim)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_decode_params_give_the_same_logits_and_a_head_only_to_tied_models(family):
  """``decode_params``: a tied model (Llama, GPT-2) decodes from its embedding's transpose,
  stored as ``lm_head`` on XLA:CPU; the cached logits are those of the params as they are
  (float32 rounding apart), prefill and one step. An untied model's params come back unchanged."""
  import dataclasses
  from gamejax.models import gpt2, lm
  cfg = CFG if family == "llama" else gpt2.GPT2Config(vocab_size=CFG.vocab_size, d_model=32,
                                                      n_layers=2, n_heads=4, max_positions=16)
  params = lm.init_params(cfg, jax.random.key(3))
  prepared = lm.decode_params(cfg, params)
  if jax.default_backend() == "cpu":
    np.testing.assert_array_equal(prepared["lm_head"], np.asarray(params["embedding"]).T)
  tokens = np.array([[5, 6, 7, 8], [9, 10, 11, 12]], np.int32)
  positions = np.tile(np.arange(4, dtype=np.int32), (2, 1))
  ones = np.ones((2, 4), np.int32)

  def prefill_and_step(p):
    cache = lm.init_cache(cfg, 2, 6)
    first, cache = lm.apply_with_cache(cfg, p, tokens, positions, ones, cache, 0)
    second, _ = lm.apply_with_cache(cfg, p, tokens[:, :1], positions[:, :1] + 4, ones[:, :1],
                                    cache, 4)
    return np.concatenate([first, second], axis=1)

  np.testing.assert_allclose(prefill_and_step(prepared), prefill_and_step(params), atol=1e-5,
                             rtol=1e-5)
  if "lm_head" in prepared:      # the decode path reads the head it is given
    doubled = prefill_and_step({**prepared, "lm_head": prepared["lm_head"] * 2.0})
    np.testing.assert_allclose(doubled, 2.0 * prefill_and_step(prepared), rtol=1e-5, atol=1e-5)
  if family == "gpt2":
    return
  untied = dataclasses.replace(CFG, tie_embeddings=False)
  untied_params = llama.init_params(untied, jax.random.key(3))
  assert lm.decode_params(untied, untied_params) is untied_params


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_a_decode_step_given_its_rope_and_bias_ahead_gives_the_same_logits(family):
  """``apply_with_cache(rope=, bias=)``, as the sampler's decode loop calls it with RoPE's tables
  and the attention bias computed before the loop: the same logits, bit for bit, as the step that
  computes them from positions and segment ids; the cache's segment ids left as they are. Rows
  left-padded (row 1's first real slot is 2), step at slot 5 of 8."""
  from gamejax.models import gpt2, lm, qwen3
  cfg = {"llama": dataclasses.replace(CFG, rope_scaling=(8.0, 1.0, 4.0, 4)),
         "qwen3": qwen3.Qwen3Config(vocab_size=40, d_model=32, n_layers=2, n_heads=4,
                                    n_kv_heads=2, head_dim=16, d_ff=48),
         "gpt2": gpt2.GPT2Config(vocab_size=40, d_model=32, n_layers=2, n_heads=4,
                                 max_positions=16)}[family]
  params = lm.decode_params(cfg, lm.init_params(cfg, jax.random.key(3)))
  tokens = np.array([[5, 6, 7, 8, 9], [0, 0, 11, 12, 13]], np.int32)
  segments = (tokens > 0).astype(np.int32)
  positions = np.array([[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]], np.int32)
  _, cache = lm.apply_with_cache(cfg, params, tokens, positions, segments,
                                 lm.init_cache(cfg, 2, 8), 0)
  token, position, one = np.array([[4], [3]], np.int32), np.array([[5], [3]], np.int32), \
      np.ones((2, 1), np.int32)

  def step(cache, ahead, rope_shift=0, hidden=0):
    if not ahead:
      return lm.apply_with_cache(cfg, params, token, position, one, cache, 5)
    slots = np.arange(8)
    visible = (slots >= np.array([[hidden], [2]])) & (slots <= 5)
    return lm.apply_with_cache(cfg, params, token, position, one, cache, 5,
                               rope=lm.rope_tables(cfg, position + np.array([[rope_shift], [0]])),
                               bias=kernels.attention_bias(jnp.asarray(visible))[:, None])

  step = jax.jit(step, static_argnums=(1, 2, 3))
  (want, want_cache), (got, got_cache) = step(cache, False), step(cache, True)
  np.testing.assert_array_equal(got, want)
  # What is given is used: row 0 told to skip its slot 0, or (with RoPE) to rotate by one more
  # position, gets other logits; row 1, told the same as before, the same.
  for shifts in [(0, 1)] + ([(1, 0)] if family != "gpt2" else []):
    other = step(cache, True, *shifts)[0]
    assert np.abs(other[0] - want[0]).max() > 1e-4, shifts
    np.testing.assert_array_equal(other[1], want[1])
  np.testing.assert_array_equal(got_cache["segment_ids"], cache["segment_ids"])
  assert want_cache["segment_ids"][:, 5].tolist() == [1, 1]
  for new, old in zip(jax.tree.leaves(got_cache["layers"]), jax.tree.leaves(want_cache["layers"])):
    np.testing.assert_array_equal(new, old)
  assert (lm.rope_tables(cfg, position) is None) == (family == "gpt2")
  with pytest.raises(ValueError, match=r"bias must be \[B, T, cache slots\] = \[2, 1, 8\]"):
    lm.apply_with_cache(cfg, params, token, position, one, cache, 5, bias=jnp.zeros((2, 1, 7)))


def test_same_params_tree_for_both_paths():
  params = llama.init_params(CFG, jax.random.key(0))
  tokens, positions, segments = _single([1, 2, 3])
  cache = llama.init_cache(CFG, 1, 4)
  variables = jax.eval_shape(
      lambda: llama.Llama(CFG).init(jax.random.key(0), tokens, positions, segments, cache, 0))
  assert (jax.tree_util.tree_structure(variables["params"])
          == jax.tree_util.tree_structure(params))


def test_init_params_matches_module_initializers_in_tree_and_distribution():
  cfg = llama.LlamaConfig(**{**CFG.__dict__, "init_std": 0.05, "param_dtype": "bfloat16"})
  params = llama.init_params(cfg, jax.random.key(0))
  dummy = jnp.zeros((1, 1), jnp.int32)
  reference = jax.eval_shape(
      lambda: llama.Llama(cfg).init(jax.random.key(0), dummy, dummy, dummy + 1)["params"])
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(reference)
  for (path, x), ref in zip(jax.tree_util.tree_leaves_with_path(params),
                            jax.tree_util.tree_leaves(reference)):
    assert x.shape == ref.shape and x.dtype == jnp.bfloat16, path
    x = np.asarray(x, np.float32)
    if path[-1].key == "scale":
      np.testing.assert_array_equal(x, 1.0)
    else:
      assert abs(x.std() - 0.05) < 0.01 and abs(x.mean()) < 0.01, path
  other = llama.init_params(cfg, jax.random.key(1))
  assert not np.array_equal(other["embedding"], params["embedding"])
  assert not np.array_equal(params["block_0"]["attn"]["wqkv"], params["block_1"]["attn"]["wqkv"])


def test_param_count_and_flops_match_hand_formulas():
  d, h, kv, k, f, v, n = 32, 4, 2, 8, 48, 40, 2
  per_layer = 2 * d + d * h * k + 2 * d * kv * k + h * k * d + 3 * d * f
  assert llama.param_count(CFG) == v * d + n * per_layer + d
  untied = llama.LlamaConfig(**{**CFG.__dict__, "tie_embeddings": False})
  assert llama.param_count(untied) == llama.param_count(CFG) + d * v
  matmul = n * (2 * d * h * k + 2 * d * kv * k + 3 * d * f) + d * v
  assert llama.flops_per_token(CFG, 64) == 6 * matmul + 12 * n * d * 64 / 2
  counted = sum(x.size for x in jax.tree_util.tree_leaves(llama.init_params(CFG, jax.random.key(0))))
  assert counted == llama.param_count(CFG)


def test_gradients_are_finite_and_nonzero():
  params = _random_params(CFG)
  tokens = np.array([[1, 5, 6, 7, 0, 0]], np.int32)
  positions = np.array([[0, 1, 2, 3, 0, 0]], np.int32)
  segments = np.array([[1, 1, 1, 1, 0, 0]], np.int32)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(llama.apply(CFG, p, tokens, positions, segments))))(
      params)
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(np.isfinite(g).all() for g in leaves)
  assert all(np.abs(g).max() > 0 for g in leaves)


@pytest.mark.parametrize("block", [4, 64])
def test_gradients_match_finite_differences_of_numpy_reference(monkeypatch, block):
  """The hand-written backward passes (dense, SwiGLU, blocked self-attention) against central
  differences of the float64 NumPy forward, along a random direction within each weight."""
  monkeypatch.setattr(kernels, "ATTENTION_BLOCK", block)  # block 4 of T=14: 4 blocks, 1 ragged
  params = _random_params(CFG)
  rng = np.random.default_rng(5)
  a, b = rng.integers(3, CFG.vocab_size, 6), rng.integers(3, CFG.vocab_size, 5)
  tokens = np.array([np.r_[a, b, 0, 0, 0], np.r_[0, b, a, 0, 0]], np.int32)
  positions = np.array([np.r_[np.arange(6), np.arange(5), 0, 0, 0],
                        np.r_[0, np.arange(5), np.arange(6), 0, 0]], np.int32)
  segments = np.array([[1] * 6 + [2] * 5 + [0] * 3, [0] + [1] * 5 + [2] * 6 + [0] * 2], np.int32)
  weights = rng.standard_normal((2, 14, CFG.vocab_size)) * (segments[..., None] > 0)

  def loss(p):  # fresh jit: ATTENTION_BLOCK is read at trace time
    return jnp.sum(llama.apply(CFG, p, tokens, positions, segments) * weights.astype(np.float32))

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  np_loss = lambda p: float(np.sum(_np_forward(CFG, p, tokens, positions, segments) * weights))
  assert abs(float(value) - np_loss(params)) < 1e-4 * abs(np_loss(params)) + 1e-4
  flat, treedef = jax.tree_util.tree_flatten(params)
  flat = [np.asarray(x, np.float64) for x in flat]
  for i, g in enumerate(jax.tree_util.tree_leaves(grads)):
    direction = rng.standard_normal(flat[i].shape)
    shifted = lambda eps: jax.tree_util.tree_unflatten(
        treedef, [x + eps * direction if j == i else x for j, x in enumerate(flat)])
    eps = 1e-5
    want = (np_loss(shifted(eps)) - np_loss(shifted(-eps))) / (2 * eps)
    got = float(np.sum(np.asarray(g, np.float64) * direction))
    assert abs(got - want) < 2e-3 * abs(want) + 1e-3, (i, got, want)


def test_bfloat16_compute_is_close_to_float32():
  cfg16 = llama.LlamaConfig(**{**CFG.__dict__, "dtype": "bfloat16"})
  params = _random_params(CFG)
  tokens, positions, segments = _single([1, 4, 9, 16, 25])
  lo = _jit_apply(cfg16, params, tokens, positions, segments)
  hi = _jit_apply(CFG, params, tokens, positions, segments)
  assert lo.dtype == jnp.float32
  np.testing.assert_allclose(lo, hi, atol=0.15 * np.abs(hi).max())


@pytest.mark.parametrize("kwargs, field", [
    ({"d_model": 30, "n_heads": 4}, "d_model"),
    ({"n_heads": 4, "n_kv_heads": 3}, "n_heads"),
    ({"n_layers": 0}, "n_layers"),
    ({"vocab_size": 2.5}, "vocab_size"),
    ({"norm_eps": 0.0}, "norm_eps"),
    ({"dtype": "float64"}, "dtype"),
    ({"d_model": 12, "n_heads": 4, "n_kv_heads": 2}, "head_dim"),
    ({"attention": "flash"}, "attention"),
])
def test_config_validation_names_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    llama.LlamaConfig(**kwargs)


def test_mismatched_input_shapes_raise():
  params = llama.init_params(CFG, jax.random.key(0))
  tokens, positions, segments = _single([1, 2, 3])
  with pytest.raises(ValueError, match="positions_BT"):
    llama.apply(CFG, params, tokens, positions[:, :2], segments)
