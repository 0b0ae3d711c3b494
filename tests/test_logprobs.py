"""Token log-probs read block by block (``gamejax.models.logprobs``, ``logits_chunk``): against a
NumPy log-softmax of the full logits, through the apply wrappers, in the payoffs and the compiled
GRPO step, and the memory it saves."""
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gamejax import records, sharding, step as game_step
from gamejax.games.base import legal_moves
from gamejax.models import lm, logprobs
from gamejax.models.gpt2 import GPT2Config, GPT2ConfigError
from gamejax.models.llama import LlamaConfig, LlamaConfigError
from gamejax.models.qwen3 import Qwen3Config
from gamejax.payoffs import dpo, grpo, imitation
from gamejax.payoffs.base import Play, token_logprobs
from gamejax.players import judges, policy, reference

V = 97
CFGS = {
    "llama": LlamaConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                         tie_embeddings=False),
    "gpt2": GPT2Config(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=64),
    "qwen3": Qwen3Config(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64),
}


def _record(seed=0, lengths=(11, 23, 17, 6), width=24):
  rng = np.random.default_rng(seed)
  return records.from_transcripts(
      [(rng.integers(3, V, n).astype(np.int32), rng.integers(1, 3, n).astype(np.int32))
       for n in lengths], width)


def _np_scores(logits_BTV, targets_BT):
  """A hand-written log-softmax at the targets, in float64, and the argmax."""
  x = np.asarray(logits_BTV, np.float64)
  shifted = x - x.max(axis=-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
  return np.take_along_axis(logp, targets_BT[..., None], axis=-1)[..., 0], x.argmax(axis=-1)


def _chunked(cfg, chunk):
  return dataclasses.replace(cfg, logits_chunk=chunk)


@pytest.mark.parametrize("name,chunks", [("llama", (1, 5, 24, 100)), ("gpt2", (5,)),
                                         ("qwen3", (7,))])
def test_blocks_of_positions_give_the_log_softmax_of_the_full_logits(name, chunks):
  """Blocks of one position, of several (the last one partial), of the whole record (24) and
  larger than it."""
  cfg = CFGS[name]
  params = lm.init_params(cfg, jax.random.PRNGKey(0))
  moves = _record()
  targets = np.asarray(records.next_tokens(moves))
  logits = lm.apply(cfg, params, moves.tokens, moves.positions, moves.segment_ids)
  want_logp, want_argmax = _np_scores(logits, targets)
  for chunk in chunks:
    scored = lm.apply(_chunked(cfg, chunk), params, moves.tokens, moves.positions,
                      moves.segment_ids, targets=targets)
    assert isinstance(scored, logprobs.Scored)
    np.testing.assert_allclose(scored.logprobs, want_logp, rtol=1e-5, atol=1e-5, err_msg=chunk)
    np.testing.assert_array_equal(scored.argmax, want_argmax, err_msg=chunk)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_the_gradient_through_the_blocks_is_the_full_logits_gradient(name):
  cfg = CFGS[name]
  params = lm.init_params(cfg, jax.random.PRNGKey(0))
  moves = _record(1)
  payoff = imitation(("agent", "opponent"))
  grads = {}
  for chunk in (0, 7):
    apply = lm.bind(_chunked(cfg, chunk))
    assert logprobs.reads_targets(apply) == (chunk > 0)
    grads[chunk] = jax.jit(jax.grad(lambda p: payoff(p, Play(apply, moves, {}, None))[0]))(params)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads[0]))
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[7])):
    np.testing.assert_allclose(b, a, atol=1e-5 * scale)


def test_wrappers_pass_their_transform_of_the_logits_into_the_blocks():
  """``at_temperature(legal_moves(apply))`` scores the masked, then scaled logits either way."""
  cfg = CFGS["llama"]
  params = lm.init_params(cfg, jax.random.PRNGKey(0))
  moves = _record(2)
  legal = np.random.default_rng(0).random((V, V)) < 0.3
  legal[np.arange(V), np.asarray(records.next_tokens(moves)).max()] = True
  got, want = (token_logprobs(policy.at_temperature(legal_moves(apply, legal), 0.7), params,
                              moves)
               for apply in (lm.bind(_chunked(cfg, 4)), functools.partial(lm.apply, cfg)))
  np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got.argmax, want.argmax)
  assert logprobs.reads_targets(game_step.bind_frozen(lm.bind(_chunked(cfg, 4)), {}))


def test_a_wrappers_transform_comes_before_its_callers():
  inner = lambda params, tokens, positions, segment_ids, targets, logits_map: logits_map(
      jnp.ones((1, 1, 2)), tokens)
  scale = lambda apply: lambda *a, **options: apply(
      *a, **logprobs.then(options, lambda logits, _: 2.0 * logits))
  shift = lambda apply: lambda *a, **options: apply(
      *a, **logprobs.then(options, lambda logits, _: logits + 1.0))
  out = shift(scale(inner))(None, None, None, None, targets=None)   # scale, then shift
  np.testing.assert_array_equal(out, [[[3.0, 3.0]]])


def test_readers_of_sampled_moves_skip_the_records_opening_and_its_head():
  """A record that opens with data (``opening``: a sampled play's prompts, 9 slots here) is read
  from position ``opening - 1`` on by a reader of sampled moves (``sampled_only``: the RL payoffs'
  and the reference's log-probs): there the log-probs are NumPy's float64 log-softmax of the full
  logits, before it 0, and the gradient of their sum is the whole record's; XLA counts the LM
  head's FLOPs at the positions read only, in GRPO's gradient (forward and backward) and in the
  reference's forward. A reader of every token (imitation) still reads the opening."""
  vocab, opening = 1024, 9
  cfg = dataclasses.replace(CFGS["llama"], vocab_size=vocab, logits_chunk=4)
  params = lm.init_params(cfg, jax.random.PRNGKey(0))
  moves = jax.tree.map(jnp.asarray, _record(width=24))
  moves = records.GameRecord(moves.tokens % vocab, moves.positions, moves.segment_ids,
                             moves.players, opening=opening)
  everything = moves.replace(opening=0)
  targets = np.asarray(records.next_tokens(moves))
  want, _ = _np_scores(lm.apply(_chunked(cfg, 0), params, moves.tokens, moves.positions,
                                moves.segment_ids), targets)
  apply = lm.bind(cfg)
  read = jax.jit(lambda p, only: token_logprobs(apply, p, moves, sampled_only=only).logprobs,
                 static_argnums=1)
  skipped, whole = np.asarray(read(params, True)), np.asarray(read(params, False))
  np.testing.assert_allclose(skipped[:, opening - 1:], want[:, opening - 1:], atol=2e-5)
  np.testing.assert_array_equal(skipped[:, :opening - 1], 0.0)
  np.testing.assert_allclose(whole, want, atol=2e-5)
  grad = jax.jit(jax.grad(lambda p, only: read(p, only)[:, opening - 1:].sum()), static_argnums=1)
  for a, b in zip(*(jax.tree.leaves(grad(params, only)) for only in (True, False))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
  # (XLA counts a loop's body once: the record in one block, to see the positions not read.)
  one_block = lm.bind(dataclasses.replace(cfg, logits_chunk=64))
  flops_of = lambda f, m: jax.jit(f).lower(params, m).compile().cost_analysis()["flops"]
  judged = {"agent/rewards": jnp.arange(4.0), "behaviour_logprobs": jnp.zeros(targets.shape),
            "reference_token_logprobs": jnp.zeros(targets.shape)}
  grpo_grad = jax.grad(lambda p, m: grpo(2, beta=0.1)(p, Play(one_block, m, judged, None))[0])
  ref = lambda p, m: reference.token_logprobs(one_block, p, m, reference.ALL_PLAYERS)
  head = 2 * cfg.d_model * vocab * targets.shape[0] * (opening - 1)   # its forward, not read
  # forward and two backward GEMMs (XLA:CPU merges the recomputation with the forward)
  assert flops_of(grpo_grad, everything) - flops_of(grpo_grad, moves) > 2.9 * head
  assert flops_of(ref, everything) - flops_of(ref, moves) > 0.99 * head
  imitate = jax.jit(lambda m: imitation(("agent",))(params, Play(apply, m, {}, None))[0])
  assert float(imitate(moves)) == float(imitate(everything))


def test_a_negative_or_fractional_chunk_is_refused_naming_the_field():
  with pytest.raises(LlamaConfigError, match="LlamaConfig.logits_chunk=-1"):
    LlamaConfig(logits_chunk=-1)
  with pytest.raises(GPT2ConfigError, match="GPT2Config.logits_chunk=2.5"):
    GPT2Config(logits_chunk=2.5)


def test_reading_in_blocks_holds_one_block_of_logits_not_the_record():
  """XLA's memory analysis of the imitation payoff's compiled gradient at a vocabulary of 8,192:
  in blocks of 16 positions the temporaries are a third of the full logits' (the logits and
  their gradient, 2 x 33.6 MB, are gone)."""
  vocab, b, t = 8192, 4, 256
  cfg = LlamaConfig(vocab_size=vocab, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
  rng = np.random.default_rng(0)
  moves = records.from_transcripts(
      [(rng.integers(3, vocab, t).astype(np.int32), np.ones(t, np.int32)) for _ in range(b)], t)
  params = jax.eval_shape(lambda: lm.init_params(cfg, jax.random.PRNGKey(0)))
  payoff = imitation(("agent",))
  temp = {}
  for chunk in (0, 16):
    apply = lm.bind(_chunked(cfg, chunk))
    grad = jax.jit(jax.grad(lambda p: payoff(p, Play(apply, moves, {}, None))[0]))
    temp[chunk] = grad.lower(params).compile().memory_analysis().temp_size_in_bytes
  logits_bytes = b * t * vocab * 4
  assert temp[0] > 2 * logits_bytes
  assert temp[16] < temp[0] / 3, temp


def test_dpo_and_the_reference_read_blocks_for_the_same_loss():
  cfg = CFGS["llama"]
  params = lm.init_params(cfg, jax.random.PRNGKey(0))
  ref_params = jax.tree.map(lambda x: x * 0.9, params)
  moves = _record(3, lengths=(9, 14, 12, 20))      # 2 chosen rows, then 2 rejected
  out = {}
  for chunk in (0, 3):
    apply = lm.bind(_chunked(cfg, chunk))
    judged = {reference.REFERENCE_TOKEN_LOGPROBS: reference.token_logprobs(
        apply, ref_params, moves, reference.ALL_PLAYERS)}
    out[chunk] = jax.jit(jax.value_and_grad(
        lambda p: dpo(0.5, players=("agent", "opponent"))(p, Play(apply, moves, judged, None)),
        has_aux=True))(params)
  (v0, m0), g0 = out[0]
  (v3, m3), g3 = out[3]
  assert float(v3) == pytest.approx(float(v0), rel=1e-5)
  for key in m0:      # log-ratios: differences of sums of ~50 log-probs
    assert float(m3[key]) == pytest.approx(float(m0[key]), rel=1e-4, abs=1e-5), key
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g3)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_ppo_reads_its_log_probs_and_entropy_in_blocks(monkeypatch):
  """An actor-critic (``policy_value.bind``) with ``logits_chunk``: PPO's ratio, entropy bonus
  and value loss from the blocks (traced there), the same loss, metrics and gradients."""
  from gamejax.models import policy_value
  from gamejax.payoffs import ppo
  traced = []
  chunked = logprobs.chunked
  monkeypatch.setattr(logprobs, "chunked", lambda *a, **k: traced.append(1) or chunked(*a, **k))
  cfg = CFGS["llama"]
  params = policy_value.init_params(cfg, jax.random.PRNGKey(0))
  moves = _record(4)
  rng = np.random.default_rng(4)
  shape = moves.tokens.shape
  judged = {"behaviour_logprobs": -4.6 + 0.3 * rng.standard_normal(shape),
            "agent/advantages": rng.standard_normal(shape), "agent/returns": rng.standard_normal(shape),
            "agent/old_values": 0.1 * rng.standard_normal(shape)}
  judged = {k: jnp.asarray(v, jnp.float32) for k, v in judged.items()}
  out = {}
  for chunk in (0, 5):
    apply = policy_value.bind(_chunked(cfg, chunk))
    assert logprobs.reads_targets(apply) == (chunk > 0)
    payoff = ppo(entropy_coef=0.01)
    out[chunk] = jax.jit(jax.value_and_grad(
        lambda p: payoff(p, Play(apply, moves, judged, None)), has_aux=True))(params)
    assert bool(traced) == (chunk > 0)
  (v0, m0), g0 = out[0]
  (v5, m5), g5 = out[5]
  assert float(v5) == pytest.approx(float(v0), rel=1e-5)
  assert float(m0["entropy"]) > 4.0      # near-uniform over 97 tokens: log 97 = 4.57
  for key in m0:
    assert float(m5[key]) == pytest.approx(float(m0[key]), rel=1e-4, abs=1e-6), key
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g5)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def _grpo_step(cfg, share_prompt=False):
  """``(state, metrics)`` after one compiled GRPO step (sample, judge, reference, payoff, SGD)."""
  group, new = 4, 9
  apply = lm.bind(cfg)
  judge = judges.function_judge(lambda moves, facts: (facts["completion"] < V // 2).mean(axis=-1))
  game = game_step.Game(
      {"agent": game_step.Learner(apply, grpo(group, beta=0.1), optax.sgd(1.0))},
      play=policy.sampled_play(cfg, group, new, eos_id=5, share_prompt=share_prompt),
      respond=judges.responders(judge, reference.reference(apply)))
  params = lm.init_params(cfg, jax.random.PRNGKey(0))
  state = game_step.init_state(game, {"agent": params}, jax.random.PRNGKey(1),
                               frozen={"reference": jax.tree.map(jnp.copy, params)})
  step, _ = game_step.make_step(game, sharding.make_mesh(1, 1), jax.eval_shape(lambda: state))
  rng = np.random.default_rng(0)
  lengths = np.array([7, 2, 5], np.int32)
  prompts = np.where(np.arange(7)[None] >= 7 - lengths[:, None], rng.integers(6, V, (3, 7)), 0)
  batch = {"prompt": prompts.astype(np.int32)[None], "prompt_lengths": lengths[None]}
  return jax.device_get(step(state, batch))


def test_a_grpo_step_reading_blocks_matches_the_full_logits():
  """The compiled GRPO step (the learner's payoff and the reference's log-probs, each group's
  prompt computed once) with the logits read 3 positions at a time: the same metrics and update
  up to float rounding. (Without the shared prompt: the SFT run and DPO above, and the
  8-device GRPO test in test_shared_prompt.py, which reads blocks too.)"""
  (plain, m_plain), (chunked, m_chunked) = (
      _grpo_step(_chunked(CFGS["llama"], chunk), share_prompt=True) for chunk in (0, 3))
  for key in m_plain:
    np.testing.assert_allclose(m_chunked[key], m_plain[key], rtol=1e-4, atol=1e-6, err_msg=key)
  for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(chunked.params)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_a_run_with_logits_chunk_from_gin_reads_blocks_and_trains_alike(tmp_path, monkeypatch):
  """``--gin.LlamaConfig.logits_chunk`` from the command line to the compiled step: an SFT stage
  reads its logits in blocks (traced, and only then) and logs the same metrics step for step,
  and the same held-out loss (``evaluation.heldout`` reads blocks too)."""
  from gamejax import cli
  traced = []
  chunked = logprobs.chunked
  monkeypatch.setattr(logprobs, "chunked", lambda *a, **k: traced.append(1) or chunked(*a, **k))
  metrics = {}
  for chunk in (0, 6):
    del traced[:]
    work = tmp_path / str(chunk)
    code = cli.main(["train", "--gin_file=experiments/arithmetic/sft.gin", f"--workdir={work}",
                     "--no_progress", f"--gin.LlamaConfig.logits_chunk={chunk}",
                     "--gin.LlamaConfig.d_model=32", "--gin.LlamaConfig.n_layers=1",
                     "--gin.LlamaConfig.d_ff=64", "--gin.sft/Stage.steps=2",
                     "--gin.sft/Stage.steps_per_call=1", "--gin.sft/arena.num_train=50",
                     "--gin.sft/arena.num_test=10",
                     f"--gin.Experiment.data_dir='{tmp_path / 'data'}'"])
    assert code == 0
    assert bool(traced) == (chunk > 0)
    assert f"logits_chunk = {chunk}" in (work / "config.gin").read_text()
    metrics[chunk] = [json.loads(line) for line in open(work / "metrics.jsonl")]
    metrics[chunk].append(json.loads((work / "summary.json").read_text())["sft"])
  assert len(metrics[0]) == len(metrics[6]) == 3
  for plain, blocks in zip(metrics[0], metrics[6]):
    for key in ("agent/loss", "agent/token_accuracy", "agent/grad_norm", "heldout_loss"):
      if key in plain:
        assert blocks[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), key
