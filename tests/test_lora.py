"""LoRA (``gamejax.models.lora``) in the compiled step: only adapters learn, the base is frozen and
never in the optimizer, the gradient at ``B = 0`` is the full gradient projected through the
adapter, optimizer memory scales with the rank, and a PEFT export loaded by ``peft`` onto the
transformers model gives gamejax's logits."""
import dataclasses
import functools
import json
import os

import jax
import numpy as np
import optax
import pytest

from gamejax import sharding, step as game_step
from gamejax.interop import hf
from gamejax.models import fusion, kernels, llama, lm, lora, partitioning
from gamejax.payoffs import imitation
from gamejax.payoffs.base import Play
from gamejax.records import GameRecord

from test_step import _batches

CFG = llama.LlamaConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
LCFG = lora.LoraConfig(rank=4, alpha=8.0, targets=r"q_proj|v_proj|down_proj")


def _state(lcfg=LCFG, lr=3e-3):
  base = llama.init_params(CFG, jax.random.key(0))
  adapters = lora.init(CFG, lcfg, jax.random.key(1), base="agent/base")
  learner = game_step.Learner(functools.partial(lm.apply, CFG), imitation(("agent",)),
                              optax.adam(lr))
  game = game_step.Game(learners={"agent": learner})
  state = game_step.init_state(game, {"agent": adapters}, jax.random.PRNGKey(2),
                               frozen={"agent/base": base})
  return game, state, base


def test_targets_follow_the_regex_and_a_regex_matching_nothing_lists_the_weights():
  names = [t.name for t in lora.targets(CFG, LCFG)]
  assert len(names) == 6 and all(("q_proj" in n or "v_proj" in n or "down_proj" in n) for n in names)
  with pytest.raises(lora.LoraConfigError, match=r"matches none of LlamaConfig's dense weights: "
                     r"\[.*'model.layers.N.self_attn.q_proj.weight'"):
    lora.targets(CFG, lora.LoraConfig(targets="query_key_value"))
  with pytest.raises(lora.LoraConfigError, match="rank=0"):
    lora.LoraConfig(rank=0)
  with pytest.raises(lora.LoraConfigError, match="merged='yes' must be True or False"):
    lora.LoraConfig(merged="yes")


def test_a_compiled_step_changes_only_the_adapters():
  game, state, base = _state()
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  fn, shardings = game_step.make_step(game, mesh, jax.eval_shape(lambda: state))
  before = jax.tree.map(np.asarray, state)
  new, metrics = fn(jax.device_put(state, shardings), _batches(3, 4, 36, 0))
  assert np.isfinite(np.asarray(metrics["loss"])).all()
  jax.tree.map(np.testing.assert_array_equal, new.frozen, before.frozen)   # the base, bitwise
  for path, pair in lora._pairs(new.params["agent"].adapters):
    assert not np.array_equal(pair["b"], np.zeros_like(pair["b"])), path
  # The optimizer holds state for the adapters only: no leaf has a base weight's shape.
  base_shapes = {x.shape for x in jax.tree.leaves(base) if x.ndim > 1}
  assert not {x.shape for x in jax.tree.leaves(new.opt_state) if np.ndim(x) > 1} & base_shapes


def test_gradient_at_init_is_the_full_gradient_projected_through_the_adapter():
  _, state, base = _state()
  moves = GameRecord(**jax.tree.map(lambda x: x[0], _batches(1, 4, 36, 1)))
  payoff = imitation(("agent",))
  apply = functools.partial(lm.apply, CFG)

  full = jax.grad(lambda p: payoff(p, Play(apply, moves, {}, jax.random.key(0)))[0])(base)
  frozen = {"agent/base": base}
  bound = game_step.bind_frozen(apply, frozen)
  adapters = state.params["agent"]
  grads = jax.grad(lambda p: payoff(p, Play(bound, moves, {}, jax.random.key(0), frozen))[0])(
      adapters)
  full = fusion.unfuse(full, adapters.fused)                   # adapters name standard weights
  for path, pair in lora._pairs(grads.adapters):
    g_w = full
    for part in path:
      g_w = g_w[part]
    a = dict(lora._pairs(adapters.adapters))[path]["a"]
    g_flat = np.asarray(g_w).reshape(a.shape[0], -1)              # [in, out]
    np.testing.assert_allclose(pair["b"], LCFG.scale * np.asarray(a).T @ g_flat,
                               rtol=2e-4, atol=1e-7)
    np.testing.assert_array_equal(pair["a"], np.zeros_like(pair["a"]))   # B = 0: no gradient


def _random_adapters(cfg, targets, seed=1):
  adapters = lora.init(cfg, lora.LoraConfig(rank=4, alpha=8.0, targets=targets),
                       jax.random.key(seed), base="b")
  leaves, tree = jax.tree.flatten(adapters.adapters)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return adapters.replace(adapters=jax.tree.unflatten(
      tree, [x + 0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))


# Wide enough that the adapters' own GEMMs are small beside the frozen weights' (rank 4).
WIDE = llama.LlamaConfig(vocab_size=32, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2,
                         d_ff=256)
LOW_RANK_CASES = {
    # q and v of the fused q | k | v (k's columns get no delta), none of gate | up, down.
    "llama_parts": (WIDE, r"q_proj|v_proj|down_proj"),
    "llama_all": (WIDE, r"q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"),
    "gpt2": (None, r"c_attn|c_proj|c_fc"),
}


@pytest.mark.parametrize("case", sorted(LOW_RANK_CASES))
def test_the_training_forward_reads_low_rank_weights_and_forms_no_frozen_gradient(case):
  """A payoff's apply (``step.bind_frozen``) reads LoRA's targets as ``kernels.LowRank``: ``x W
  + s (x A) B``. Its logits and adapter gradients are the merged weights' (``lora.merge``, the
  sampler's), and its compiled gradient has none of the frozen weights' ``x^T dy`` GEMMs:
  XLA's FLOPs fall by most of theirs (``2 T in out`` each, less the adapters' own GEMMs, ``6 T
  r (in + out)``)."""
  from gamejax.models import gpt2
  cfg, targets = LOW_RANK_CASES[case]
  cfg = cfg or gpt2.GPT2Config(vocab_size=32, d_model=128, n_layers=2, n_heads=4,
                               max_positions=64)
  base = lm.init_params(cfg, jax.random.key(0))
  adapters = _random_adapters(cfg, targets)
  moves = GameRecord(**jax.tree.map(lambda x: x[0], _batches(1, 4, 36, 1)))
  payoff = imitation(("agent", "opponent"))
  frozen = {"b": base}
  bound = game_step.bind_frozen(functools.partial(lm.apply, cfg), frozen)
  loss = jax.jit(jax.value_and_grad(lambda p: payoff(p, Play(bound, moves, {},
                                                                jax.random.key(0)))[0]))
  # ``LoraConfig.merged``: the same apply reads the adapted weights formed (lora.merge; the
  # FLOPs below tell the two apart).
  as_merged = dataclasses.replace(adapters, merged=True)
  (v_m, g_m), (v_l, g_l) = loss(as_merged), loss(adapters)
  np.testing.assert_allclose(v_l, v_m, rtol=1e-6)
  for (path, pm), (_, pl) in zip(lora._pairs(g_m.adapters), lora._pairs(g_l.adapters)):
    for k in ("a", "b"):
      scale = np.abs(np.asarray(pm[k])).max()
      np.testing.assert_allclose(pl[k], pm[k], atol=2e-5 * scale, err_msg=str(path + (k,)))
  if case == "llama_all":   # rematerialised blocks ("dots" saves each dense output) alike
    dots = dataclasses.replace(cfg, remat="dots")
    remat = game_step.bind_frozen(functools.partial(lm.apply, dots), frozen)
    v_r, g_r = jax.jit(jax.value_and_grad(
        lambda p: payoff(p, Play(remat, moves, {}, jax.random.key(0)))[0]))(adapters)
    np.testing.assert_allclose(v_r, v_l, rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7),
                 g_r.adapters, g_l.adapters)
  # At B = 0 the low-rank forward is the base model's, bit for bit.
  fresh = lora.init(cfg, lora.LoraConfig(rank=4, alpha=8.0, targets=targets), jax.random.key(1),
                    base="b")
  args = (moves.tokens, moves.positions, moves.segment_ids)
  np.testing.assert_array_equal(bound(fresh, *args), lm.apply(cfg, base, *args))

  flops = {name: loss.lower(p).compile().cost_analysis()["flops"]
           for name, p in (("merged", as_merged), ("low_rank", adapters))}
  frozen_grads = 2 * moves.tokens.size * sum(
      np.prod(pair["a"].shape[:1]) * np.prod(pair["b"].shape[1:])
      for _, pair in lora._pairs(adapters.adapters))
  assert flops["merged"] - flops["low_rank"] > 0.7 * frozen_grads, (flops, frozen_grads)


def test_low_rank_weights_read_as_arrays_are_the_merged_ones(monkeypatch):
  """Where a model reads a weight other than in its 2-D form (tensor parallelism's regrouped q |
  k | v and split gate | up), a ``LowRank`` gives the adapted weight formed: the same logits as
  the merged params."""
  monkeypatch.setattr(partitioning, "split_count", lambda name: 2)
  base = llama.init_params(CFG, jax.random.key(0))
  adapters = _random_adapters(CFG, LOW_RANK_CASES["llama_all"][1])
  moves = GameRecord(**jax.tree.map(lambda x: x[0], _batches(1, 2, 36, 1)))
  args = (moves.tokens, moves.positions, moves.segment_ids)
  want = lm.apply(CFG, lora.merge(base, adapters), *args)
  got = lm.apply(CFG, lora.low_rank_params(base, adapters), *args)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  lr = lora.low_rank_params(base, adapters)["block_0"]["mlp"]["w_gate_up"]
  merged = lora.merge(base, adapters)["block_0"]["mlp"]["w_gate_up"]
  np.testing.assert_array_equal(lr[:, 1], merged[:, 1])
  # Read contracting its second axis (as a tied embedding is for the LM head): formed too.
  wo = lora.low_rank_params(base, adapters)["block_0"]["attn"]["wo"]
  wo = wo.reshape(wo.n_in, CFG.d_model)                  # [H K, D], square here
  assert isinstance(wo, kernels.LowRank)
  x = jax.random.normal(jax.random.key(3), (3, CFG.d_model))
  np.testing.assert_array_equal(kernels.dense(x, wo, 1), kernels.dense(x, wo.materialize(), 1))


def _opt_bytes(rank):
  lcfg = lora.LoraConfig(rank=rank, alpha=8.0, targets=LCFG.targets)
  _, state, _ = _state(lcfg)
  return sum(x.nbytes for x in jax.tree.leaves(state.opt_state)), lora.count(state.params["agent"])


def test_optimizer_memory_scales_with_the_rank_not_the_model():
  (small, n_small), (large, n_large) = _opt_bytes(2), _opt_bytes(8)
  # Adam's two float32 moments per adapter weight and a step counter, nothing of the base.
  assert small == 2 * 4 * n_small + 4 and large == 2 * 4 * n_large + 4
  assert n_large == 4 * n_small


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merged_model_matches_peft_on_transformers_and_the_export_is_atomic(tmp_path, family):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  from gamejax.models import gpt2
  if family == "llama":
    cfg = llama.LlamaConfig(vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                            d_ff=64, tie_embeddings=False)
    targets = r"q_proj|layers\.1\..*o_proj|up_proj|lm_head"
  else:                                  # Conv1D weights, stored [in, out]: fan_in_fan_out
    cfg = gpt2.GPT2Config(vocab_size=48, d_model=32, n_layers=2, n_heads=4, max_positions=64)
    targets = r"c_attn|h\.1\.mlp\.c_proj"
  base = lm.init_params(cfg, jax.random.key(3))
  lcfg = lora.LoraConfig(rank=4, alpha=12.0, targets=targets)
  adapters = lora.init(cfg, lcfg, jax.random.key(4), base="b")
  # B = 0 merges to the base; random B is what training would leave.
  adapters = adapters.replace(adapters=jax.tree.map(
      lambda x: x + 0.05 * jax.random.normal(jax.random.key(5), x.shape), adapters.adapters))
  merged = lora.merge(base, adapters)
  base_dir, peft_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
  hf.save(cfg, base, base_dir)
  lora.save_peft(cfg, lcfg, adapters, peft_dir, base_model=base_dir)
  with pytest.raises(FileExistsError):
    lora.save_peft(cfg, lcfg, adapters, peft_dir)
  assert sorted(os.listdir(peft_dir)) == [lora.PEFT_CONFIG, lora.PEFT_WEIGHTS]
  assert json.load(open(os.path.join(peft_dir, lora.PEFT_CONFIG)))["r"] == 4

  model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
  model = peft.PeftModel.from_pretrained(model, peft_dir).eval()
  tokens = np.random.default_rng(0).integers(0, 48, (2, 40)).astype(np.int32)
  with torch.no_grad():
    want = model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  positions = np.broadcast_to(np.arange(40, dtype=np.int32), tokens.shape)
  got = lm.apply(cfg, merged, tokens, positions, np.ones_like(tokens))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)
  # The training forward's low-rank weights (PEFT's own unmerged x W + s (x A) B) alike.
  got = lm.apply(cfg, lora.low_rank_params(base, adapters), tokens, positions,
                 np.ones_like(tokens))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


def test_a_lora_grpo_stage_from_gin_keeps_its_base_as_the_reference_and_resumes(tmp_path):
  """experiments/arithmetic/grpo.gin's GRPO stage with ``Stage.lora``: the state holds the base
  once (as the KL reference), checkpoints the adapters, resumes exactly, and hands the next
  stage the merged model."""
  from gamejax import config, run
  EXP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
  config.parse([f"{EXP}/arithmetic/grpo.gin", f"{EXP}/models/tiny.gin"],
               ["grpo/Stage.steps=4", "Stage.steps_per_call=2", "grpo/Stage.checkpoint_every=2",
                "GROUP_SIZE=2", "grpo/Stage.batch_size=2", "grpo/arena.num_train=50",
                "grpo/arena.num_test=10", "eval/arena.num_test=10", "Evaluation.num_examples=10",
                "Evaluation.batch_size=10", "grpo/Optimizer.learning_rate=1e-2",
                "grpo/Stage.lora=@LoraConfig()", "LoraConfig.rank=2",
                "LoraConfig.targets='q_proj|v_proj'",
                f"Experiment.data_dir='{tmp_path / 'data'}'"])
  exp = config.build_experiment()
  index = [s.name for s in exp.stages].index("grpo")
  assert exp.stages[index].reference and exp.stages[index].lora.rank == 2
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  quiet = dict(progress=False, log=lambda _: None)
  straight = run.run_stage(exp, index, None, str(tmp_path / "a"), mesh, **quiet)
  run.run_stage(exp, index, None, str(tmp_path / "b"), mesh, stop_after_steps=2, **quiet)
  resumed = run.run_stage(exp, index, None, str(tmp_path / "b"), mesh, **quiet)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
               straight.params, resumed.params)
  params, frozen = run.restore_players(exp, index, str(tmp_path / "a"))
  adapters = params["agent"]
  assert isinstance(adapters, lora.LoraParams) and adapters.base == "reference"
  assert sorted(frozen) == ["reference"]                       # the base, held once
  merged = straight.params["agent"]                            # what the next stage starts from
  base = frozen["reference"]
  # q and v adapted: their parts of the stored wqkv moved, k's did not; the MLP is untouched.
  assert adapters.fused                                        # wq, wk, wv stored as wqkv
  std_merged, std_base = (fusion.unfuse(p, adapters.fused) for p in (merged, base))
  assert not np.array_equal(std_merged["block_0"]["attn"]["wq"], std_base["block_0"]["attn"]["wq"])
  assert not np.array_equal(std_merged["block_0"]["attn"]["wv"], std_base["block_0"]["attn"]["wv"])
  np.testing.assert_array_equal(std_merged["block_0"]["attn"]["wk"], std_base["block_0"]["attn"]["wk"])
  np.testing.assert_array_equal(merged["block_0"]["mlp"]["w_gate_up"],
                                base["block_0"]["mlp"]["w_gate_up"])
  jax.tree.map(np.testing.assert_array_equal, run.restore_params(exp, index, str(tmp_path / "a"))["agent"],
               merged)


def test_cli_exports_a_lora_stage_as_a_peft_adapter_and_as_the_merged_model(tmp_path, sums_texts):
  """`gamejax export --format=peft` of a LoRA SFT stage, loaded by peft onto its base, gives the
  logits of `--format=hf`'s merged export."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  from gamejax import cli, run
  EXP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
  work = tmp_path / "run"
  assert cli.main(["train", f"--gin_file={EXP}/text/sft.gin", f"--gin_file={EXP}/models/tiny.gin",
                   f"--gin.local_text.path='{sums_texts}'", "--gin.sft/Stage.steps=4",
                   "--gin.sft/Stage.steps_per_call=2", "--gin.sft/Stage.batch_size=4",
                   "--gin.sft/Stage.seq_len=32", "--gin.sft/Stage.lora=@LoraConfig()",
                   "--gin.LoraConfig.targets='q_proj|down_proj'",
                   "--gin.sft/Optimizer.learning_rate=0.05", f"--workdir={work}",
                   "--no_progress"]) == 0
  assert cli.main(["export", f"--workdir={work}", "--format=peft", str(tmp_path / "adapter")]) == 0
  assert cli.main(["export", f"--workdir={work}", "--format=hf", str(tmp_path / "merged")]) == 0
  exp, _ = cli._load_run(str(work))                  # pylint: disable=protected-access
  _, frozen = run.restore_players(exp, 0, str(work))
  hf.save(exp.model, frozen["agent/base"], str(tmp_path / "base"))
  tokens = torch.tensor(np.random.default_rng(0).integers(3, 200, (2, 24)), dtype=torch.long)
  with torch.no_grad():
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    adapted = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")),
        str(tmp_path / "adapter")).eval()
    want, got = merged(input_ids=tokens).logits.numpy(), adapted(input_ids=tokens).logits.numpy()
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).eval()
    before = base(input_ids=tokens).logits.numpy()
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  assert np.abs(want - before).max() > 1e-3                    # the adapters learnt something
  assert cli.main(["export", f"--workdir={work}", "--format=peft", str(tmp_path / "adapter")]) == 2
