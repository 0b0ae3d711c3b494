"""A group's prompt computed once in the training forward (``gamejax.models.shared_prompt``),
against the full forward over every row: logits, gradients, the GRPO step, and the fallback when
the rows do not share what the record says."""
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gamejax import records, sharding, step as game_step
from gamejax.models import lm, shared_prompt
from gamejax.models.gpt2 import GPT2Config
from gamejax.models.llama import LlamaConfig
from gamejax.models.qwen3 import Qwen3Config
from gamejax.players import judges, opponents, policy, reference

CFGS = {
    "llama": LlamaConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64),
    "gpt2": GPT2Config(vocab_size=128, d_model=32, n_layers=2, n_heads=4, d_ff=64),
    "qwen3": Qwen3Config(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         d_ff=64),
}
GROUPS, GROUP, WIDTH, NEW = 3, 4, 7, 9
EOS = 5      # drawn often enough by an untrained model that completions stop at many lengths


def _prompts():
  rng = np.random.default_rng(0)
  lengths = np.array([WIDTH, 2, 5], np.int32)
  prompts = np.zeros((GROUPS, WIDTH), np.int32)
  for u, n in enumerate(lengths):
    prompts[u, WIDTH - n:] = rng.integers(6, 128, n)
  return {"prompt": prompts, "prompt_lengths": lengths}


def _moves(cfg, params, share=True, turns=1, seed=3):
  """A sampled play's record (the policy's params), its rows telling what they share."""
  opponent = opponents.fixed_reply("ok?") if turns > 1 else None
  play = policy.sampled_play(cfg, GROUP, NEW, eos_id=EOS, turns=turns, opponent=opponent,
                             share_prompt=share)
  state = game_step.init_state(game_step.Game({}), {"agent": params}, jax.random.PRNGKey(1))
  moves, _ = jax.jit(play)(state, _prompts(), jax.random.PRNGKey(seed))
  return moves


def _inputs(moves):
  return moves.tokens, moves.positions, moves.segment_ids


def _weighted_logprob(apply, moves, weights_BT):
  def objective(params):
    logits = apply(params, *_inputs(moves))
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, records.next_tokens(moves)[..., None], axis=-1)[..., 0]
    return (picked * weights_BT).sum()
  return objective


@pytest.mark.parametrize("name,turns", [("llama", 1), ("gpt2", 1), ("qwen3", 2)])
def test_a_groups_prompt_computed_once_gives_the_full_forwards_logits_and_gradients(name, turns):
  cfg = CFGS[name]
  params = lm.init_params(cfg, jax.random.PRNGKey(0))
  moves = _moves(cfg, params, turns=turns)
  share = moves.shared_prompt
  assert share is not None and (share.group_size, share.width) == (GROUP, WIDTH)
  lengths = np.asarray(moves.segment_ids.sum(1))
  assert len(set(lengths.tolist())) > 2, "the completions should stop at several lengths"
  assert bool(shared_prompt.layout_holds(*_inputs(moves), share))

  full = jax.jit(functools.partial(lm.apply, cfg))(params, *_inputs(moves))
  once = jax.jit(functools.partial(shared_prompt.once, cfg, share=share))(params, *_inputs(moves))
  real = np.asarray(moves.segment_ids) > 0
  np.testing.assert_allclose(np.asarray(once)[real], np.asarray(full)[real], atol=2e-5)

  # Gradients: every token's log-prob weighted (prompt tokens too: the reference scores them).
  weights = jax.random.normal(jax.random.PRNGKey(7), moves.tokens.shape) * real
  grad = lambda apply: jax.jit(jax.grad(_weighted_logprob(apply, moves, weights)))(params)
  g_full = grad(functools.partial(lm.apply, cfg))
  g_once = grad(lambda p, *x: lm.apply(cfg, p, *x, shared_prompt=share))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_full), jax.tree.leaves(g_once)):
    assert float(jnp.abs(a - b).max()) <= 1e-4 * float(jnp.abs(a).max()), (
        jax.tree_util.keystr(path))


def test_computing_the_prompt_once_takes_no_more_memory_than_the_full_forward():
  """At a vocabulary whose logits dominate the step's memory, the compiled forward and backward
  with the prompt computed once needs no more temporary memory than the full one's (the LM head
  reads the gathered states: one ``[B, T, V]`` of logits, as the full forward has; gathering the
  logits themselves took 1.3x)."""
  cfg = dataclasses.replace(CFGS["llama"], vocab_size=8192)
  params = lm.init_params(cfg, jax.random.PRNGKey(0))
  moves = _moves(cfg, params)
  weights = (moves.segment_ids > 0).astype(jnp.float32)

  def temp_bytes(apply):
    grad = jax.jit(jax.grad(_weighted_logprob(apply, moves, weights)))
    return grad.lower(params).compile().memory_analysis().temp_size_in_bytes

  full = temp_bytes(functools.partial(lm.apply, cfg))
  once = temp_bytes(lambda p, *x: shared_prompt.once(cfg, p, *x, moves.shared_prompt))
  assert full > moves.tokens.size * cfg.vocab_size * 4       # the logits dominate
  assert once <= 1.05 * full, (once, full)


def test_rows_that_do_not_share_their_prompt_get_the_full_forward_when_checked():
  """Rows re-ordered across groups (as a random minibatch would): the layout check fails and the
  checked forward runs the full one; computing a prompt once there would give other logits."""
  cfg = CFGS["llama"]
  params = lm.init_params(cfg, jax.random.PRNGKey(0))
  moves = _moves(cfg, params)
  order = np.array([0, 4, 1, 5, 2, 6, 3, 7, 8, 9, 10, 11])      # groups 0 and 1 interleaved
  mixed = jax.tree.map(lambda x: x[order], moves)
  assert not bool(shared_prompt.layout_holds(*_inputs(mixed), mixed.shared_prompt))
  real = np.asarray(mixed.segment_ids) > 0
  full = np.asarray(jax.jit(functools.partial(lm.apply, cfg))(params, *_inputs(mixed)))
  shared = np.asarray(jax.jit(lambda p: shared_prompt.apply(
      cfg, p, *_inputs(mixed), mixed.shared_prompt, checked=True))(params))
  np.testing.assert_allclose(shared[real], full[real], atol=2e-5)
  wrong = np.asarray(jax.jit(lambda p: shared_prompt.once(cfg, p, *_inputs(mixed),
                                                         mixed.shared_prompt))(params))
  assert np.abs(wrong[real] - full[real]).max() > 1e-2
  # A record that is not right-aligned fails the check too.
  shifted = [jnp.roll(x, -1, axis=1) for x in _inputs(moves)]
  assert not bool(shared_prompt.layout_holds(*shifted, moves.shared_prompt))


def test_the_play_marks_its_record_only_when_asked_and_the_tokens_do_not_change():
  cfg = CFGS["llama"]
  params = lm.init_params(cfg, jax.random.PRNGKey(0))
  shared, plain = _moves(cfg, params, share=True), _moves(cfg, params, share=False)
  assert plain.shared_prompt is None
  for field in ("tokens", "positions", "segment_ids", "players"):
    np.testing.assert_array_equal(getattr(shared, field), getattr(plain, field))
  np.testing.assert_array_equal(shared.shared_prompt.prompt_lengths,
                                np.repeat(_prompts()["prompt_lengths"], GROUP))
  single = policy.sampled_play(cfg, 1, NEW, eos_id=EOS, share_prompt=True)
  state = game_step.init_state(game_step.Game({}), {"agent": params}, jax.random.PRNGKey(1))
  assert single(state, _prompts(), jax.random.PRNGKey(3))[0].shared_prompt is None


def test_a_shared_prompt_that_cannot_fit_the_record_is_refused():
  cfg = CFGS["llama"]
  params = lm.init_params(cfg, jax.random.PRNGKey(0))
  moves = _moves(cfg, params)
  for bad, match in (({"group_size": 5}, "do not split into groups"),
                     ({"width": moves.tokens.shape[1]}, "prompt width")):
    share = dataclasses.replace(moves.shared_prompt, **bad)
    with pytest.raises(ValueError, match=match):
      lm.apply(cfg, params, *_inputs(moves), shared_prompt=share)


def test_a_rematerialised_model_computes_the_prompt_once_with_the_same_gradients():
  cfg = CFGS["llama"]
  params = lm.init_params(cfg, jax.random.PRNGKey(0))
  moves = _moves(cfg, params)
  weights = (moves.segment_ids > 0).astype(jnp.float32)
  grads = {remat: jax.jit(jax.grad(_weighted_logprob(
      lambda p, *x, c=dataclasses.replace(cfg, remat=remat): shared_prompt.once(
          c, p, *x, moves.shared_prompt), moves, weights)))(params)
      for remat in ("none", "full")}
  for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads["full"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _grpo_step(params, share: bool, accumulate: int = 1):
  """``(state, metrics)`` after one compiled GRPO step (sample, judge, reference, payoff, SGD)
  from ``params`` on the test's prompts."""
  from gamejax.payoffs import grpo
  cfg = CFGS["llama"]
  apply = functools.partial(lm.apply, cfg)
  judge = judges.function_judge(lambda moves, facts: (facts["completion"] < 64).mean(axis=-1))
  game = game_step.Game(
      {"agent": game_step.Learner(apply, grpo(GROUP, beta=0.1), optax.sgd(1.0),
                                  accumulate=accumulate)},
      play=policy.sampled_play(cfg, GROUP, NEW, eos_id=EOS, share_prompt=share),
      respond=judges.responders(judge, reference.reference(apply)))
  copy = lambda: jax.tree.map(jnp.copy, params)       # the step donates its state
  state = game_step.init_state(game, {"agent": copy()}, jax.random.PRNGKey(1),
                               frozen={"reference": copy()})
  step, _ = game_step.make_step(game, sharding.make_mesh(1, 1), jax.eval_shape(lambda: state))
  return jax.device_get(step(state, jax.tree.map(lambda x: x[None], _prompts())))


def test_a_grpo_step_with_the_prompt_computed_once_matches_the_full_forwards():
  """One compiled GRPO step both ways: the same metrics and params up to float rounding."""
  params = lm.init_params(CFGS["llama"], jax.random.PRNGKey(0))
  (plain, m_plain), (shared, m_shared) = (_grpo_step(params, share) for share in (False, True))
  assert set(m_plain) == set(m_shared)
  for key in m_plain:
    np.testing.assert_allclose(m_shared[key], m_plain[key], rtol=1e-4, atol=1e-6, err_msg=key)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), plain.params["agent"], params)
  assert max(jax.tree.leaves(moved)) > 1e-4, "the step should move the params"
  for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(shared.params)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_the_experiment_refuses_a_shared_prompt_it_cannot_compute_once():
  from gamejax import config, run
  from gamejax.payoffs import ppo
  stage = run.Stage(name="rl", data=config.arena(), payoff=ppo(), steps=10, player="policy_value",
                    rollout=run.Rollout(group_size=2, share_prompt=True))
  with pytest.raises(run.ExperimentError, match="share_prompt"):
    run.Experiment(stages=[stage], model=LlamaConfig()).validate()


def test_the_step_keeps_a_shared_prompt_only_for_rows_that_are_whole_groups():
  cfg = CFGS["llama"]
  moves = _moves(cfg, lm.init_params(cfg, jax.random.PRNGKey(0)))
  rows = moves.tokens.shape[0]
  blocks = game_step.microbatch_rows(rows, 3)                  # 3 microbatches of one group each
  kept = game_step.take_moves(moves, jnp.asarray(blocks[1]), rows, whole_groups=True)
  assert kept.shared_prompt is not None
  np.testing.assert_array_equal(kept.tokens, moves.tokens[GROUP:2 * GROUP])
  shuffled = jax.random.permutation(jax.random.PRNGKey(0), rows)[:GROUP]
  dropped = game_step.take_moves(moves, shuffled, rows, whole_groups=False)
  assert dropped.shared_prompt is None
  np.testing.assert_array_equal(dropped.tokens, moves.tokens[shuffled])


def test_grpo_with_microbatches_of_whole_groups_computes_prompts_once_and_matches():
  """Gradient accumulation over microbatches of whole groups, each group's prompt computed once:
  the update equals (up to rounding) one pass of the full forward over every row."""
  params = lm.init_params(CFGS["llama"], jax.random.PRNGKey(0))
  plain, shared = _grpo_step(params, False)[0], _grpo_step(params, True, accumulate=3)[0]
  for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(shared.params)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_a_run_with_share_prompt_trains_as_the_full_forward_does(tmp_path, monkeypatch):
  """``Rollout.share_prompt`` from the experiment to the compiled step: the step computes the
  prompts once (traced there, and only then), and a GRPO stage's logged metrics both ways, step
  for step, agree up to float rounding. The second run also decodes in runs of 2 steps
  (``Rollout.cache_block``, which reaches the sampler)."""
  from gamejax import config, run, sampling
  from gamejax.payoffs import grpo
  traced, blocks = [], []
  once, generate = shared_prompt.once, sampling.generate
  monkeypatch.setattr(shared_prompt, "once", lambda *a, **k: traced.append(1) or once(*a, **k))
  monkeypatch.setattr(sampling, "generate",
                      lambda *a, **k: blocks.append(k["cache_block"]) or generate(*a, **k))
  metrics = {}
  for share in (False, True):
    del traced[:], blocks[:]
    stage = run.Stage(name="rl", data=config.arena(players=[("perfect", 1.0)], num_train=50,
                                                   num_test=10, max_digits=2),
                      payoff=grpo(2, beta=0.1), reference=True, steps=2, batch_size=2,
                      steps_per_call=1,
                      rollout=run.Rollout(group_size=2, max_new_tokens=4, prompt_len=12,
                                          share_prompt=share, cache_block=2 if share else 64))
    exp = run.Experiment(stages=[stage], data_dir=str(tmp_path / "data"),
                         model=LlamaConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                           d_ff=64))
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    work = tmp_path / str(share)
    run.run_stage(exp, 0, None, str(work), mesh, progress=False, log=lambda _: None)
    metrics[share] = [json.loads(line) for line in open(work / "metrics.jsonl")]
    assert bool(traced) == share     # the learner's and the reference's forwards
    assert set(blocks) == {2 if share else 64}
  assert len(metrics[True]) == len(metrics[False]) == 2
  for plain, shared in zip(metrics[False], metrics[True]):
    for key in ("agent/loss", "agent/kl", "agent/reward_mean", "agent/grad_norm"):
      assert shared[key] == pytest.approx(plain[key], rel=1e-3, abs=1e-6), key


def run_on(mesh):
  """Two GRPO steps with each group's prompt computed once, on ``mesh`` (``eight_devices``
  compares meshes: data, and data x FSDP x tensor): 8 prompts x 2 completions. The
  payoffs read the logits 4 positions at a time (``logits_chunk``; tensor parallelism shards
  each block's vocabulary), and the sampler draws from 1,500 words: in two levels of 128-word
  blocks, the last one short (``sampling._inverse_cdf``), the vocabulary sharded too."""
  from gamejax.payoffs import grpo
  cfg = dataclasses.replace(CFGS["llama"], logits_chunk=4, vocab_size=1500)
  apply = lm.bind(cfg)
  judge = judges.function_judge(lambda moves, facts: (facts["completion"] < 64).mean(axis=-1))
  game = game_step.Game(
      {"agent": game_step.Learner(apply, grpo(2, beta=0.1), optax.sgd(1.0))},
      play=policy.sampled_play(cfg, 2, NEW, eos_id=EOS, share_prompt=True),
      respond=judges.responders(judge, reference.reference(apply)))
  params = lm.init_params(cfg, jax.random.PRNGKey(0))
  state = game_step.init_state(game, {"agent": params}, jax.random.PRNGKey(1),
                               frozen={"reference": jax.tree.map(jnp.copy, params)})
  step, shardings = game_step.make_step(game, mesh, jax.eval_shape(lambda: state))
  state = jax.device_put(state, shardings)
  rng = np.random.default_rng(1)
  lengths = rng.integers(1, WIDTH + 1, 8).astype(np.int32)
  prompts = np.where(np.arange(WIDTH)[None] >= WIDTH - lengths[:, None],
                     rng.integers(6, 128, (8, WIDTH)), 0).astype(np.int32)
  batch = jax.device_put({"prompt": prompts[None], "prompt_lengths": lengths[None]},
                         sharding.batch_sharding(mesh, leading=1))
  for _ in range(2):
    state, metrics = step(state, batch)
  return np.asarray(metrics["agent/loss"]), jax.device_get(state.params)


def test_a_groups_prompt_computed_once_on_eight_devices_matches_one_device():
  import eight_devices
  eight_devices.assert_eight_devices_match_one("test_shared_prompt", timeout=300,
                                              meshes=eight_devices.DATA_AND_ALL_AXES)
