"""Weights stored fused (``gamejax.models.fusion``, ``llama.fused_storage``): the stored tree is the
standard one joined, every consumer of the standard layout sees it unchanged, and the gradient's
global norm, hence clipping, is bitwise that of the unfused tree."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gamejax.models import fusion, llama, lm
from gamejax.models.qwen2 import Qwen2Config
from gamejax.models.qwen3 import Qwen3Config

CONFIGS = {
    "llama": llama.LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                               d_ff=48),
    "qwen2": Qwen2Config(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48),
    "qwen3": Qwen3Config(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, d_ff=48),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_stored_params_are_the_standard_ones_joined(name):
  cfg = CONFIGS[name]
  params = lm.init_params(cfg, jax.random.key(0))
  attn, mlp = params["block_0"]["attn"], params["block_0"]["mlp"]
  h, kv, k, d, f = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model, cfg.d_ff
  assert attn["wqkv"].shape == (d, h + 2 * kv, k) and mlp["w_gate_up"].shape == (d, 2, f)
  assert ("qkv_bias" in attn) == cfg.qkv_bias and not {"wq", "wk", "wv"} & set(attn)
  std = llama.unfuse(cfg, params)
  a, m = std["block_0"]["attn"], std["block_0"]["mlp"]
  np.testing.assert_array_equal(np.concatenate([a["wq"], a["wk"], a["wv"]], 1), attn["wqkv"])
  np.testing.assert_array_equal(np.stack([m["w_gate"], m["w_up"]], 1), mlp["w_gate_up"])
  assert (a["wq"].shape, a["wk"].shape, m["w_up"].shape) == ((d, h, k), (d, kv, k), (d, f))
  jax.tree.map(np.testing.assert_array_equal, llama.fuse(cfg, std), params)
  # Each standard leaf is found in its stored place, read and written there.
  specs = llama.fused_storage(cfg)
  path, spec, i = fusion.locate(("block_1", "attn", "wk"), specs)
  assert path == ("block_1", "attn", "wqkv") and spec.parts[i] == "wk"
  np.testing.assert_array_equal(fusion.part(params["block_1"]["attn"]["wqkv"], spec, i),
                                std["block_1"]["attn"]["wk"])
  moved = fusion.set_part(params["block_1"]["attn"]["wqkv"], spec, i, jnp.zeros((d, kv, k)))
  assert float(jnp.abs(moved[:, h:h + kv]).max()) == 0.0
  np.testing.assert_array_equal(moved[:, :h], params["block_1"]["attn"]["wqkv"][:, :h])
  assert fusion.locate(("block_0", "attn", "wo"), specs) == (("block_0", "attn", "wo"), None, -1)


def test_init_draws_the_standard_layout_then_fuses_it():
  """A seed gives the weights it gave before the weights were stored fused: ``single_draw_init``
  over the standard layout's shapes, in its tree order."""
  cfg = CONFIGS["qwen2"]
  std_shapes = jax.eval_shape(lambda: llama.unfuse(cfg, llama.init_params(cfg, jax.random.key(0))))
  want = jax.jit(lambda key: llama.single_draw_init(
      std_shapes, key, cfg.init_std, {"scale": 1, "q_bias": 0, "k_bias": 0, "v_bias": 0}))(
          jax.random.key(7))
  jax.tree.map(np.testing.assert_array_equal, llama.unfuse(cfg, llama.init_params(
      cfg, jax.random.key(7))), want)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_clipping_a_fused_gradient_is_bitwise_clipping_the_unfused_one(name):
  """The global norm sums per leaf, so cutting the weights into other leaves changes its rounding;
  ``fusion.clip_by_global_norm`` sums over the standard layout and matches optax's clipping of
  the unfused tree bit for bit (the main job's figures depend on it: an ulp of the norm at one
  step grows into a different model)."""
  cfg = CONFIGS[name]
  specs = llama.fused_storage(cfg)
  clip = jax.jit(lambda g: fusion.clip_by_global_norm(1.0, specs).update(g, optax.EmptyState())[0])
  want = jax.jit(lambda g: optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())[0])
  norm = jax.jit(lambda g: fusion.global_norm(g, specs))
  for seed in range(12):   # on this CPU, summing the fused leaves whole is an ulp off at seed 4 or 8
    grads = jax.tree.map(lambda x: x * 40.0, lm.init_params(cfg, jax.random.key(seed)))
    std = llama.unfuse(cfg, grads)
    assert float(norm(grads)) == float(jax.jit(optax.tree.norm)(std)) > 1.0   # clipping is active
    jax.tree.map(np.testing.assert_array_equal, llama.unfuse(cfg, clip(grads)), want(std))
  # No fused weights: optax's own.
  plain = {"w": jnp.ones(3) * 5.0}
  np.testing.assert_array_equal(fusion.clip_by_global_norm(1.0, ()).update(plain, None)[0]["w"],
                                optax.clip_by_global_norm(1.0).update(plain, None)[0]["w"])


def test_clipping_takes_the_norm_the_step_computed():
  """The game step computes the gradient's norm for its metric and passes it on (``grad_norm``,
  an extra argument ``optax.chain`` and ``schema.in_dtype`` forward): the same update as the
  norm computed inside; a norm passed is the norm used. ``in_dtype`` drops a norm of gradients
  it casts (theirs would differ)."""
  from gamejax.run import schema
  grads = {"w": jnp.arange(1.0, 5.0), "b": jnp.full((2,), -3.0)}
  norm = optax.tree.norm(grads)
  clip = fusion.clip_by_global_norm(1.0)
  np.testing.assert_array_equal(clip.update(grads, None, grad_norm=norm)[0]["w"],
                                clip.update(grads, None)[0]["w"])
  np.testing.assert_array_equal(clip.update(grads, None, grad_norm=2 * norm)[0]["w"],
                                clip.update(grads, None)[0]["w"] / 2)
  opt = schema.Optimizer(learning_rate=0.1, warmup_steps=0).build(10)
  state = opt.init(grads)
  step = lambda **kw: opt.update(grads, state, grads, **kw)[0]["w"]
  np.testing.assert_array_equal(step(grad_norm=norm), step())
  assert not np.array_equal(step(grad_norm=1e3 * norm), step())
  cast = schema.Optimizer(learning_rate=0.1, warmup_steps=0, state_dtype="bfloat16").build(10)
  state = cast.init(grads)
  np.testing.assert_array_equal(cast.update(grads, state, grads, grad_norm=1e3 * norm)[0]["w"],
                                cast.update(grads, state, grads)[0]["w"])
