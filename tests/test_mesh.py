"""The ("data", "fsdp", "tensor") mesh and the logical axis rules: parameter specs from paths,
optimizer states as their params, activation constraints that are no-ops off the step, bad meshes
and non-dividing parameters as exit 2; on 8 simulated devices the SFT (GPT-2) and GRPO (Llama)
steps match one device on 8x1x1, 2x4x1 and 2x2x2 meshes, and parameters really shrink per device.
(The pre-training and two-player steps run the same meshes in test_step.py and test_matrix.py.)"""
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import eight_devices
from gamejax import cli, records, sharding, step as game_step
from gamejax.models import gpt2, llama, lora, partitioning, policy_value
from gamejax.payoffs import imitation
from gamejax.players import judges

LLAMA = llama.LlamaConfig(vocab_size=272, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64)
GPT2 = gpt2.GPT2Config(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_positions=16)
MESH_222 = {"data": 2, "fsdp": 2, "tensor": 2}
PIPELINE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "experiments", "arithmetic", "pipeline.gin")


def _abstract(fn, cfg):
  return jax.eval_shape(lambda: fn(cfg, jax.random.key(0)))


# ---- specs from logical names ---------------------------------------------------------------------

def test_rules_split_heads_mlp_and_vocab_over_tensor_and_embed_over_fsdp():
  specs = sharding.param_specs(_abstract(llama.init_params, LLAMA), MESH_222)
  attn, mlp = specs["block_0"]["attn"], specs["block_0"]["mlp"]
  # q | k | v stored fused: its H + 2G = 8 heads in even chunks over tensor; gate | up over mlp.
  assert attn["wqkv"] == P("fsdp", "tensor", None) and attn["wo"] == P("tensor", None, "fsdp")
  assert mlp["w_gate_up"] == P("fsdp", None, "tensor") and mlp["w_down"] == P("tensor", "fsdp")
  # The standard layout's names (checkpoints, LoRA), as a Hugging Face import places them.
  assert sharding.param_spec_at(("attn", "wq"), (32, 4, 8), MESH_222) == P("fsdp", "tensor", None)
  assert sharding.param_spec_at(("mlp", "w_gate"), (32, 64), MESH_222) == P("fsdp", "tensor")
  assert specs["embedding"] == P("tensor", "fsdp") and specs["final_norm"]["scale"] == P("fsdp")
  g = sharding.param_specs(_abstract(gpt2.init_params, GPT2), MESH_222)
  assert g["block_0"]["attn"]["w_qkv"] == P("fsdp", None, "tensor", None)
  assert g["block_1"]["mlp"]["b_fc"] == P("tensor") and g["position_embedding"] == P(None, "fsdp")
  # Activations: the batch takes data and fsdp first, so the residual's embed stays whole.
  assert sharding.logical_spec(("batch", "length", "embed"), (8, 4, 32), MESH_222) == P(
      ("data", "fsdp"), None, None)
  assert sharding.logical_spec(("batch", "length", "vocab"), (8, 4, 33), MESH_222) == P(
      ("data", "fsdp"), None, None)            # 33 does not divide: left to XLA, no error


def test_fewer_kv_heads_than_tensor_are_replicated_other_params_keep_the_fsdp_rule():
  cfg = llama.LlamaConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=1, d_ff=64)
  mesh = {"data": 1, "fsdp": 2, "tensor": 2}
  attn = sharding.param_specs(_abstract(llama.init_params, cfg), mesh)["block_0"]["attn"]
  assert sharding.param_spec_at(("attn", "wk"), (32, 1, 8), mesh) == P("fsdp", None, None)
  assert sharding.param_spec_at(("attn", "wq"), (32, 4, 8), mesh) == P("fsdp", "tensor", None)
  assert attn["wqkv"] == P("fsdp", "tensor", None)             # 4 + 2 * 1 = 6 heads split in 2
  odd = dataclasses.replace(cfg, n_heads=3, d_model=24, d_ff=66, vocab_size=63)  # 3 + 2 = 5: replicated
  assert sharding.param_specs(_abstract(llama.init_params, odd), {"data": 1, "fsdp": 2, "tensor": 3}
                              )["block_0"]["attn"]["wqkv"] == P("fsdp", None, None)
  # A value head, LoRA adapters: no table names them; their largest fsdp-divisible dim is split.
  pv = sharding.param_specs(jax.eval_shape(lambda: policy_value.init_params(
      cfg, jax.random.key(0))), mesh)
  assert pv["value"]["w"] == P("fsdp") and pv["value"]["b"] == P()
  assert pv["policy"]["block_0"]["attn"]["wo"] == P("tensor", None, "fsdp")
  adapters = jax.eval_shape(lambda: lora.init(cfg, lora.LoraConfig(rank=4), jax.random.key(0),
                                              "base"))
  for path, spec in jax.tree_util.tree_leaves_with_path(sharding.param_specs(adapters, mesh),
                                                        is_leaf=lambda s: isinstance(s, P)):
    assert "tensor" not in spec, path


def test_optimizer_state_takes_the_specs_of_the_params_it_mirrors():
  params = _abstract(llama.init_params, LLAMA)
  opt = jax.eval_shape(lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)).init(
      llama.init_params(LLAMA, jax.random.key(0))))
  want = sharding.param_specs(params, MESH_222)
  got = sharding.mirrored_specs(opt, params, MESH_222)
  adam = got[1][0]
  for moment in (adam.mu, adam.nu):
    assert jax.tree.leaves(moment, is_leaf=lambda s: isinstance(s, P)) == jax.tree.leaves(
        want, is_leaf=lambda s: isinstance(s, P))
  assert adam.count == P()


def test_a_dimension_that_does_not_divide_is_an_error_naming_the_parameter():
  cfg = llama.LlamaConfig(vocab_size=64, d_model=48, n_layers=1, n_heads=6, n_kv_heads=3, d_ff=64)
  with pytest.raises(sharding.ShardingError,
                     match=r"param block_0/attn/wo: dim 0 \(heads=6\) is not divisible by "
                           r"mesh tensor=4"):
    sharding.check_params(_abstract(llama.init_params, cfg), {"data": 1, "fsdp": 1, "tensor": 4})
  # The standard layout's names keep their rule: an HF import places wk by it.
  with pytest.raises(sharding.ShardingError,
                     match=r"param attn/wk: dim 1 \(kv_heads=3\) is not divisible by mesh tensor=2"):
    sharding.param_spec_at(("attn", "wk"), (48, 3, 8), {"data": 1, "fsdp": 1, "tensor": 2})
  with pytest.raises(sharding.ShardingError, match=r"param block_0/attn/wo: dim 2 \(embed=48\) "
                                                   r"is not divisible by mesh fsdp=32"):
    sharding.check_params(_abstract(llama.init_params, cfg), {"data": 1, "fsdp": 32, "tensor": 1})


def test_mesh_settings_must_make_the_device_count():
  assert sharding.mesh_shape(-1, 2, 2, n_devices=8) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(sharding.ShardingError, match=r"Experiment.mesh_data=2 x mesh_fsdp=2 x "
                                                   r"mesh_tensor=1 = 4, but there are 8 devices"):
    sharding.mesh_shape(2, 2, 1, n_devices=8)
  with pytest.raises(sharding.ShardingError, match="mesh_tensor=0"):
    sharding.mesh_shape(-1, 1, 0, n_devices=8)
  mesh = sharding.make_mesh(data=1, fsdp=1, devices=jax.devices()[:1])   # old callers still work
  assert mesh.axis_names == sharding.AXES and mesh.size == 1


def test_a_mesh_that_is_not_the_device_count_exits_2(tmp_path, capsys):
  n = jax.device_count()
  code = cli.main(["train", f"--gin_file={PIPELINE}", f"--gin.Experiment.mesh_data={n + 1}",
                   f"--workdir={tmp_path / 'run'}"])
  err = capsys.readouterr().err
  assert code == 2, err
  assert f"Experiment.mesh_data={n + 1} x mesh_fsdp=1 x mesh_tensor=1" in err
  assert f"there are {n} devices" in err and not (tmp_path / "run").exists()


def test_constraints_are_no_ops_off_the_step_and_on_one_device():
  x = jnp.ones((2, 3, 4))
  assert partitioning.constrain(x, ("batch", "length", "embed")) is x
  with partitioning.rules(sharding.make_mesh(devices=jax.devices()[:1]), sharding.RULES):
    assert partitioning.constrain(x, ("batch", "length", "embed")) is x


# (name, devices splitting the heads); llama_kv_copied: 4 devices, 2 kv heads (2 copies of each)
@pytest.mark.parametrize("name, splits", [("llama", 2), ("llama_kv_copied", 4),
                                          ("qwen2_bias_dot_product", 2), ("qwen3_qk_norm", 2),
                                          ("gpt2", 2)])
def test_the_tensor_parallel_layouts_compute_what_the_stacked_ones_do(monkeypatch, name, splits):
  """Under tensor parallelism (``partitioning.split_count`` > 1) Llama's q | k | v heads are
  regrouped by kv head (``kernels.group_qkv``; with more devices than kv heads, each device's
  queries with a copy of their kv head) and GPT-2's by head, and SwiGLU's gate and up are two
  GEMMs, so that each device's slice of a GEMM is its own heads'. Forced here on one device
  (constraints are no-ops there): the logits and the gradient of every parameter (through the
  regrouping, the copies of kv heads, the grouped attention's backward, q/k norms, q/k/v biases
  and the library attention) are those of the stacked layouts, and so is a greedy decode from a
  KV cache of copied kv heads. (The 8-device GRPO step below decodes grouped too.)"""
  from gamejax import sampling
  from gamejax.models import lm, qwen2, qwen3
  small = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=48, init_std=0.2)
  cfg = {"llama": llama.LlamaConfig(n_kv_heads=2, **small),
         "llama_kv_copied": llama.LlamaConfig(n_kv_heads=2, **small),
         "qwen2_bias_dot_product": qwen2.Qwen2Config(n_kv_heads=2, attention="dot_product_attention",
                                                     **small),
         "qwen3_qk_norm": qwen3.Qwen3Config(n_kv_heads=2, head_dim=12, **small),
         "gpt2": gpt2.GPT2Config(max_positions=72, **{k: v for k, v in small.items()
                                                       if k != "d_ff"})}[name]
  params = lm.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(   # q/k/v biases of zero would hide a misplaced one
      lambda path, x: x + rng.normal(0, 0.3, x.shape).astype(x.dtype)
      if "qkv" in jax.tree_util.keystr(path) and x.ndim < 4 else x, params)
  t = 72       # two of the attention kernel's query blocks (kernels.ATTENTION_BLOCK = 64)
  tokens = rng.integers(1, cfg.vocab_size, (3, t)).astype(np.int32)
  positions = np.tile(np.arange(t, dtype=np.int32), (3, 1))
  segments = np.ones((3, t), np.int32)

  def loss(p):
    logits = lm.apply(cfg, p, tokens, positions, segments)
    return jnp.sum(jax.nn.log_softmax(logits)[:, :-1] * jax.nn.one_hot(tokens[:, 1:], 64)), logits

  def run():
    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    if name != "llama_kv_copied":
      return logits, grads
    prompt, lengths = sampling.left_pad([tokens[0, :4], tokens[1, :6]], 6)
    cache = jax.eval_shape(lambda: lm.init_cache(cfg, 2, 8))["layers"][0]["k"].shape
    out = sampling.generate(cfg, params, prompt, lengths, 4, jax.random.key(1), eos_id=-1)
    return logits, grads, cache, out["tokens"], out["logprobs"]

  stacked = run()
  monkeypatch.setattr(partitioning, "split_count", lambda name: splits)
  grouped = run()
  np.testing.assert_allclose(grouped[0], stacked[0], rtol=1e-5, atol=1e-5)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(stacked[1]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-5 * scale), stacked[1],
               grouped[1])
  if name == "llama_kv_copied":
    assert (stacked[2][1], grouped[2][1]) == (2, 4)      # the cache holds two copies of each
    np.testing.assert_array_equal(grouped[3], stacked[3])
    np.testing.assert_allclose(grouped[4], stacked[4], atol=1e-5)


# ---- 8 simulated devices ---------------------------------------------------------------------------

def _sft_batches(k, b, t, seed):
  """Prompt (opponent) then answer (agent) segments packed in rows: SFT scores the answers."""
  rng = np.random.default_rng(seed)
  out = {f: np.zeros((k, b, t), np.int32) for f in ("tokens", "positions", "segment_ids", "players")}
  for i in range(k):
    for r in range(b):
      for seg, col in enumerate(range(0, t - 7, 8)):
        q = rng.integers(3, GPT2.vocab_size, 4)
        out["tokens"][i, r, col:col + 8] = np.concatenate([q, q[::-1]])
        out["players"][i, r, col:col + 8] = [records.OPPONENT] * 4 + [records.AGENT] * 4
        out["segment_ids"][i, r, col:col + 8] = seg + 1
        out["positions"][i, r, col:col + 8] = np.arange(8)
  return out


def run_sft(mesh):
  """Two calls of 2 SFT steps of GPT-2 on ``mesh``: ``(losses, params)``."""
  # eps: Adam turns a gradient that is zero but for rounding (the key bias's) into +-lr steps,
  # which differ between any two reduction orders; a larger eps keeps them at rounding size.
  learner = game_step.Learner(functools.partial(gpt2.apply, GPT2), imitation(("agent",)),
                              optax.adam(3e-3, eps=1e-3))
  game = game_step.Game(learners={"agent": learner})
  state = game_step.init_state(game, {"agent": gpt2.init_params(GPT2, jax.random.key(0))},
                               jax.random.key(1))
  fn, shardings = game_step.make_step(game, mesh, jax.eval_shape(lambda: state))
  state = jax.device_put(state, shardings)
  losses = []
  for call in range(2):
    state, metrics = fn(state, _sft_batches(2, 8, 16, call))
    losses.append(np.asarray(metrics["loss"]))
  return np.concatenate(losses), jax.device_get(state.params)


def run_lora_sft(mesh):
  """One call of 2 SFT steps of LoRA adapters on every projection of Llama on ``mesh``: ``(losses,
  adapters)``. Under tensor parallelism q | k | v and gate | up are read regrouped (their
  ``kernels.LowRank`` formed merged there), the output and down projections low-rank."""
  learner = game_step.Learner(functools.partial(llama.apply, LLAMA), imitation(("agent",)),
                              optax.adam(3e-3, eps=1e-3))
  game = game_step.Game(learners={"agent": learner})
  lcfg = lora.LoraConfig(rank=4, targets="q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj")
  adapters = lora.init(LLAMA, lcfg, jax.random.key(2), base="base")
  state = game_step.init_state(game, {"agent": adapters}, jax.random.key(1),
                               frozen={"base": llama.init_params(LLAMA, jax.random.key(0))})
  fn, shardings = game_step.make_step(game, mesh, jax.eval_shape(lambda: state))
  state, metrics = fn(jax.device_put(state, shardings), _sft_batches(2, 8, 16, 0))
  return np.asarray(metrics["loss"]), jax.device_get(state.params["agent"].adapters)


def _even_tokens(moves, facts):
  """A reward that differs within groups from the first step (the arena's is 0 for an untrained
  model, and a gradient of rounding noise alone tells meshes apart under Adam)."""
  return (judges.completions(moves, facts) % 2 == 0).mean(axis=1)


def run_grpo(mesh):
  """One call of 2 GRPO steps (sampled in the step, arena judge, KL to a frozen reference) on
  ``mesh``: ``(losses, params)``."""
  from gamejax.data.prompts import PromptLoader
  from gamejax.games import arithmetic
  from gamejax.payoffs import grpo
  from gamejax.players import policy, reference
  apply = functools.partial(llama.apply, LLAMA)
  learner = game_step.Learner(apply, grpo(2, beta=0.04), optax.adam(1e-3))
  game = game_step.Game({"agent": learner}, play=policy.sampled_play(LLAMA, 2, 6, temperature=1.0),
                        respond=judges.responders(judges.function_judge(_even_tokens),
                                                  reference.reference(apply)))
  params = llama.init_params(LLAMA, jax.random.key(0))
  state = game_step.init_state(game, {"agent": params}, jax.random.key(1),
                               frozen={"reference": jax.tree.map(jnp.copy, params)})
  fn, shardings = game_step.make_step(game, mesh, jax.eval_shape(lambda: state))
  state = jax.device_put(state, shardings)
  ex = dict(arithmetic.generate_examples(arithmetic.ArenaConfig(max_digits=2), "train", 8, 0,
                                         [("perfect", 1.0)], True, False))
  batch = next(PromptLoader(list(ex.values()), 8, 10, seed=0, answer_width=4))
  batch = {k: np.stack([v, np.roll(v, 1, axis=0)]) for k, v in batch.items()}     # K = 2 steps
  state, metrics = fn(state, batch)
  return np.asarray(metrics["loss"]), jax.device_get(state.params)


def tensor_parallel_collectives(cfg, tensor=2, rows=16, length=32):
  """The collectives (kind, per-device shape) XLA puts in the compiled pre-training step of
  ``cfg`` on a mesh of ``tensor`` devices, all tensor parallel: Megatron's layout needs
  all-reduces of the ``[B, T, D]`` residual and nothing that moves q, k, v or the MLP's hidden
  states."""
  import re
  from gamejax.models import lm
  learner = game_step.Learner(lm.bind(cfg), imitation(("agent", "opponent")), optax.sgd(0.1))
  game = game_step.Game(learners={"agent": learner})
  state = game_step.init_state(game, {"agent": lm.init_params(cfg, jax.random.key(0))},
                               jax.random.key(1))
  mesh = sharding.make_mesh(1, 1, tensor, devices=jax.devices()[:tensor])
  fn, shardings = game_step.make_step(game, mesh, jax.eval_shape(lambda: state))
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, cfg.vocab_size, (1, rows, length)).astype(np.int32)
  batch = {"tokens": tokens, "positions": np.tile(np.arange(length, dtype=np.int32), (1, rows, 1)),
           "segment_ids": np.ones_like(tokens), "players": np.ones_like(tokens)}
  text = fn.lower(jax.device_put(state, shardings), batch).compile().as_text()
  pattern = (r"= \S+?\[([0-9,]*)\]\S* (all-gather|all-reduce|reduce-scatter|all-to-all|"
             r"collective-permute)(?:-start)?\(")
  return [(kind, tuple(int(d) for d in dims.split(",") if d))
          for dims, kind in re.findall(pattern, text)]


def device_bytes(tree, device) -> int:
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
             if s.device == device)


SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
import eight_devices, test_mesh as T
from gamejax import cli, sharding
assert len(jax.devices()) == 8
for run, meshes in ((T.run_sft, eight_devices.DATA_AND_ALL_AXES),
                    (T.run_lora_sft, eight_devices.MESHES[-1:]),
                    (T.run_grpo, eight_devices.MESHES)):
  one = run(sharding.make_mesh(devices=jax.devices()[:1]))
  for shape in meshes:
    got = run(sharding.make_mesh(*shape))
    np.testing.assert_allclose(one[0], got[0], rtol=1e-5, atol=1e-5, err_msg=str(shape))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5,
                                                         err_msg=str(shape)), one[1], got[1])
    print("MESH_OK", run.__name__, shape, flush=True)
params = T.gpt2.init_params(T.GPT2, jax.random.key(0))
per_device = {}
for shape in ((8, 1, 1), (4, 2, 1), (4, 1, 2), (2, 2, 2)):
  mesh = sharding.make_mesh(*shape)
  per_device[shape] = T.device_bytes(
      jax.device_put(params, sharding.state_shardings(mesh, params)), jax.devices()[0])
print(per_device)
assert per_device[(4, 2, 1)] < per_device[(8, 1, 1)] and per_device[(4, 1, 2)] < per_device[(8, 1, 1)]
assert per_device[(2, 2, 2)] < min(per_device[(4, 2, 1)], per_device[(4, 1, 2)])
for cfg, tensor in ((T.LLAMA, 2), (T.GPT2, 2), (T.LLAMA, 4)):   # 4: more devices than kv heads
  found = T.tensor_parallel_collectives(cfg, tensor)
  # (the vocabulary's log-softmax gathers [B, T, tensor] partial sums: a float per device)
  moved = [(kind, shape) for kind, shape in found
           if kind != "all-reduce" and shape[:2] == (16, 32) and np.prod(shape) > 16 * 32 * tensor]
  assert not moved, (type(cfg).__name__, moved)
  residual = [shape for kind, shape in found if kind == "all-reduce" and shape == (16, 32, 32)]
  assert len(residual) >= 4 * cfg.n_layers, found   # attention's and the MLP's, both ways
  print("TENSOR_PARALLEL_OK", type(cfg).__name__, tensor, len(found), flush=True)
code = cli.main(["train", "--gin_file=" + T.PIPELINE, "--gin.Experiment.mesh_tensor=8",
                 "--workdir=" + sys.argv[2]])
assert code == 2, code
print("ALL_OK")
"""


def test_sft_and_grpo_steps_on_three_eight_device_meshes_match_one_device(tmp_path):
  here = os.path.dirname(os.path.abspath(__file__))
  proc = eight_devices.run_script(SCRIPT, here, str(tmp_path / "run"), timeout=600)
  assert proc.returncode == 0 and "ALL_OK" in proc.stdout, proc.stdout + proc.stderr[-3000:]
  assert proc.stdout.count("TENSOR_PARALLEL_OK") == 3
  assert "is not divisible by mesh tensor=8" in proc.stderr and "param " in proc.stderr
  assert not (tmp_path / "run").exists()
