"""The agent plays inside the compiled step: sampled moves, their attribution, the arena judge."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gamejax import records, step as game_step
from gamejax.data.prompts import PromptLoader
from gamejax.data.tokenizer import EOS, ByteTokenizer
from gamejax.games import arithmetic
from gamejax.models import llama, lm
from gamejax.players import judges, policy, reference

TOK = ByteTokenizer()
CFG = llama.LlamaConfig(vocab_size=272, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64)


# ------------------------------------------------------------------ the arena's verifiable judge

def _random_texts(rng, n):
  alphabet = list("0123456789|;+=-") + ["00", "|0", "12|"]
  return ["".join(rng.choice(alphabet, size=rng.integers(0, 9))) for _ in range(n)]


def test_jitted_judge_agrees_with_host_grade_on_every_text():
  rng = np.random.default_rng(0)
  problems = [arithmetic.Problem(57, 68, "+"), arithmetic.Problem(100, 100, "-"),
              arithmetic.Problem(905, 7, "+"), arithmetic.Problem(31, 9, "-")]
  texts = _random_texts(rng, 300)
  for p in problems:     # texts that are (nearly) right, too
    texts += [str(p.answer), "0" + str(p.answer), "1|" + str(p.answer), str(p.answer)[1:],
              "9" + str(p.answer), str(p.answer) + "|"]
  n = 12
  rows, keys, want = [], [], []
  for i, text in enumerate(texts):
    problem = problems[i % len(problems)]
    ids = list(TOK.encode(text))[:n]
    # Junk after an EOS, or (a row that hit the length limit) more text and no EOS at all.
    tail = [EOS] if rng.random() < 0.8 else list(TOK.encode("x"))
    rows.append((ids + tail + list(rng.integers(3, 200, n)))[:n])
    keys.append(arithmetic.answer_digits(problem.answer, 5))
    want.append(arithmetic.grade(problem, TOK.decode_until_eos(np.asarray(rows[-1]))))
  grade = jax.jit(jax.vmap(judges.arena_grade))
  exact, partial = jax.device_get(grade(jnp.asarray(rows, jnp.int32), jnp.asarray(keys)))
  np.testing.assert_array_equal(exact, [w[0] for w in want])
  np.testing.assert_allclose(partial, [w[1] for w in want], rtol=1e-6)
  assert 0 < np.mean(exact) < 1 and 0 < np.mean(partial)   # the test covers both outcomes


def test_arena_judge_rewards_with_partial_credit():
  key = arithmetic.answer_digits(125, 4)
  texts = ["7+8+0=15;5+6+1=12|125", "7+8+0=15;5+6+0=11|115", "abc"]
  comp = np.zeros((3, 24), np.int32)
  for i, t in enumerate(texts):
    ids = list(TOK.encode(t)) + [EOS]
    comp[i, :len(ids)] = ids
  moves = records.GameRecord(*(jnp.asarray(comp),) * 4)
  facts = {"answer_digits": jnp.asarray(np.stack([key] * 3)), "completion": jnp.asarray(comp),
           "completion_mask": jnp.ones((3, 24))}
  out = judges.arena_judge(partial_credit=0.5)(None, moves, facts, jax.random.PRNGKey(0))
  np.testing.assert_allclose(out["agent/rewards"], [1.5, 1 / 3, 0.0], rtol=1e-6)
  with pytest.raises(KeyError, match="answer_digits"):
    judges.arena_judge()(None, moves, {"completion": facts["completion"]}, None)


def test_host_judge_runs_python_inside_jit():
  tok_p = jnp.asarray([[0, 0, 1, 60, 61, 2]])
  moves = records.GameRecord(tok_p, tok_p, (tok_p > 0).astype(jnp.int32),
                             jnp.asarray([[0, 0, 2, 2, 1, 1]]))
  facts = {"completion": jnp.asarray([[61, 2, 0]]), "completion_mask": jnp.asarray([[1., 1., 0.]])}
  seen = []
  judge = judges.host_judge(lambda prompt, completion: seen.append((prompt, completion)) or 0.25)
  out = jax.jit(lambda m: judge(None, m, facts, None))(moves)
  assert float(out["agent/rewards"][0]) == 0.25
  assert seen == [(TOK.decode([1, 60]), TOK.decode([61]))]


# ------------------------------------------------------------------ sampled play in the step

def _prompt_batch(n_prompts, prompt_len=10):
  cfg = arithmetic.ArenaConfig(max_digits=2)
  ex = dict(arithmetic.generate_examples(cfg, "train", n_prompts, 0, [("perfect", 1.0)], True,
                                         False))
  loader = PromptLoader(list(ex.values()), n_prompts, prompt_len, seed=0, answer_width=4)
  return next(loader), list(ex.values())


def test_prompt_loader_batches_and_state():
  batch, examples = _prompt_batch(3)
  for row, length in zip(batch["prompt"], batch["prompt_lengths"]):
    assert row[-length] == 1 and (row[:-length] == 0).all()        # left-padded, BOS first
  src = examples * 3
  a = PromptLoader(src, 4, 10, seed=3, answer_width=4)
  for _ in range(2):
    next(a)
  b = PromptLoader(src, 4, 10, seed=3, answer_width=4)
  b.set_state(a.get_state())
  np.testing.assert_array_equal(next(a)["prompt"], next(b)["prompt"])
  from gamejax.data.errors import DataError
  with pytest.raises(DataError, match="prompt_len=3"):
    next(PromptLoader(src, 2, 3, seed=0))


def _sample_game(payoff, group_size=4, new_tokens=12):
  play = policy.sampled_play(CFG, group_size, new_tokens, temperature=1.0)
  apply = functools.partial(llama.apply, CFG)
  respond = judges.responders(judges.arena_judge(), reference.reference(apply))
  learner = game_step.Learner(apply, payoff, optax.sgd(1e-2))
  return game_step.Game({"agent": learner}, play=play, respond=respond)


def test_sampled_moves_are_attributed_and_their_logprobs_match_a_forward_pass():
  batch, _ = _prompt_batch(2)
  seen = {}

  def payoff(params, play):
    seen.update(moves=play.moves, judgments=play.judgments)
    return jnp.zeros(()), {}

  game = _sample_game(payoff)
  params = llama.init_params(CFG, jax.random.PRNGKey(0))
  state = game_step.init_state(game, {"agent": params}, jax.random.PRNGKey(1),
                               frozen={"reference": jax.tree.map(jnp.copy, params)})
  moves, facts = jax.jit(game.play)(state, batch, jax.random.PRNGKey(2))
  moves, facts = jax.device_get((moves, facts))
  b, t = moves.tokens.shape
  assert (b, t) == (8, 10 + 12)
  # Prompt tokens are the opponent's, sampled tokens under the mask the agent's, the rest nobody's.
  for row in range(b):     # [padding, prompt, completion], left-padded
    g = row // 4
    n_p = batch["prompt_lengths"][g]
    n_a = int(facts["completion_mask"][row].sum())
    start = t - n_a - n_p
    np.testing.assert_array_equal(moves.tokens[row, start:start + n_p], batch["prompt"][g, 10 - n_p:])
    assert (moves.players[row, start:start + n_p] == records.OPPONENT).all()
    assert (moves.players[row, t - n_a:] == records.AGENT).all()
    assert (moves.players[row, :start] == records.NOBODY).all()
    np.testing.assert_array_equal(moves.tokens[row, t - n_a:], facts["completion"][row, :n_a])
    np.testing.assert_array_equal(moves.positions[row, start:], np.arange(n_p + n_a))
  np.testing.assert_array_equal(facts["answer_digits"][::4], batch["answer_digits"])
  # The sampler's log-probs equal a full forward pass over the record (same params).
  forward = reference.token_logprobs(functools.partial(llama.apply, CFG), params,
                                     jax.tree.map(jnp.asarray, moves))
  np.testing.assert_allclose(facts["behaviour_logprobs"], forward, atol=2e-4)
  assert (facts["behaviour_logprobs"] != 0).sum() == facts["completion_mask"].sum()
  # ... and inside the step, the payoff sees the judge's rewards and the reference's log-probs.
  step, _ = game_step.make_step(game, _mesh(), jax.eval_shape(lambda: state))
  new_state, metrics = step(state, jax.tree.map(lambda x: x[None], batch))
  j = jax.device_get(seen["judgments"])
  assert {"agent/rewards", "reference_token_logprobs", "behaviour_logprobs", "stopped"} <= set(j)


def _mesh():
  from gamejax import sharding
  return sharding.make_mesh(1, 1)


def test_multi_turn_play_attributes_every_move_and_scores_the_last():
  """agent -> opponent's feedback -> agent again: each token is its mover's, the sampler's
  log-probs of both agent moves equal a forward pass, and the facts describe the last move. Every
  move lies after the prompts' width, the record's ``opening``: log-probs read in blocks from
  there on (``logits_chunk``) are the forward's too."""
  from gamejax.players import opponents
  batch, _ = _prompt_batch(2)
  feedback = opponents.arena_feedback()
  play = policy.sampled_play(CFG, 2, 6, temperature=1.0, turns=2, opponent=feedback)
  params = llama.init_params(CFG, jax.random.PRNGKey(0))
  state = game_step.init_state(game_step.Game({}), {"agent": params}, jax.random.PRNGKey(1))
  moves, facts = jax.device_get(jax.jit(play)(state, batch, jax.random.PRNGKey(5)))
  reply_len = int(feedback(jnp.zeros((1, 6), jnp.int32),
                           {"answer_digits": jnp.full((1, 4), -1)}, None)[1].sum())
  assert moves.tokens.shape == (4, 10 + 6 + len(TOK.encode("\nwrong, again:")) + 6)
  tok = ByteTokenizer()
  for row in range(4):
    real = moves.segment_ids[row] > 0
    who = moves.players[row][real]
    n_p = int(batch["prompt_lengths"][row // 2])
    n_last = int(facts["completion_mask"][row].sum())
    # opponent (prompt), agent, opponent (reply), agent: four runs, in this order
    runs = [int(p) for i, p in enumerate(who) if i == 0 or p != who[i - 1]]
    assert runs == [records.OPPONENT, records.AGENT, records.OPPONENT, records.AGENT]
    assert (who[:n_p] == records.OPPONENT).all() and (who[-n_last:] == records.AGENT).all()
    np.testing.assert_array_equal(moves.tokens[row][real][-n_last:],
                                  facts["completion"][row, :n_last])
    reply = tok.decode(moves.tokens[row][real][who == records.OPPONENT][n_p:])
    assert reply in ("\nwrong, again:", "\nright, again:")
    np.testing.assert_array_equal(moves.positions[row][real], np.arange(real.sum()))
    assert np.flatnonzero(real)[n_p:].min() >= moves.opening       # both moves and the reply
  assert moves.opening == batch["prompt"].shape[1]
  assert reply_len == len("\nwrong, again:")
  forward = reference.token_logprobs(functools.partial(llama.apply, CFG), params,
                                     jax.tree.map(jnp.asarray, moves))
  np.testing.assert_allclose(facts["behaviour_logprobs"], forward, atol=2e-4)
  blocks = reference.token_logprobs(lm.bind(dataclasses.replace(CFG, logits_chunk=4)), params,
                                    jax.tree.map(jnp.asarray, moves))
  np.testing.assert_allclose(blocks, forward, rtol=1e-5, atol=1e-5)
  agent_next = records.next_token_weights(moves, (records.AGENT,))
  assert ((facts["behaviour_logprobs"] != 0) == (agent_next > 0)).all()


def _grpo_game(judge):
  from gamejax.payoffs import grpo
  apply = functools.partial(llama.apply, CFG)
  learner = game_step.Learner(apply, grpo(2, beta=0.04), optax.adam(1e-3))
  return game_step.Game({"agent": learner},
                        play=policy.sampled_play(CFG, 2, 12, temperature=1.0),
                        respond=judges.responders(judge, reference.reference(apply)))


def _rl_state(game):
  params = llama.init_params(CFG, jax.random.PRNGKey(0))
  return game_step.init_state(game, {"agent": params}, jax.random.PRNGKey(1),
                              frozen={"reference": jax.tree.map(jnp.copy, params)})


def test_rl_step_compiles_once_and_learns_in_place():
  """The whole GRPO game step (sample, judge, reference, payoff, update) traces once over calls."""
  game = _grpo_game(judges.arena_judge(partial_credit=1.0))
  state = _rl_state(game)
  traces = []
  step, shardings = game_step.make_step(game, _mesh(), jax.eval_shape(lambda: state),
                                        on_trace=lambda: traces.append(1))
  state = jax.device_put(state, shardings)             # as the run places it
  before = jax.device_get(state.params["agent"])
  for seed in range(3):
    batch, _ = _prompt_batch(2)
    batch = {k: np.stack([v, np.roll(v, seed, axis=0)]) for k, v in batch.items()}  # K = 2 steps
    state, metrics = step(state, batch)
  assert len(traces) == 1 and int(state.step) == 6
  assert np.all(np.isfinite(jax.device_get(metrics["loss"])))
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before,
                         jax.device_get(state.params["agent"]))
  assert any(jax.tree.leaves(changed))


def test_a_nan_judge_is_counted_and_never_reaches_the_params():
  nan_judge = judges.function_judge(lambda moves, facts: jnp.full((moves.tokens.shape[0],),
                                                                  jnp.nan))
  game = _grpo_game(nan_judge)
  state = _rl_state(game)
  before = jax.device_get(state.params["agent"])
  batch, _ = _prompt_batch(2)
  state, metrics = jax.jit(functools.partial(game_step.game_step, game))(state, batch)
  assert float(metrics["agent/skipped_nonfinite"]) == 1.0
  assert float(metrics["agent/nonfinite_rewards"]) == 4.0
  jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(state.params["agent"]))


def test_reward_model_judge_refuses_a_different_vocabulary():
  from gamejax.models import reward
  small = llama.LlamaConfig(vocab_size=128, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                            d_ff=64)
  judge = judges.reward_model_judge(CFG, functools.partial(reward.apply, small))
  game = _grpo_game(judge)
  params = llama.init_params(CFG, jax.random.PRNGKey(0))
  state = game_step.init_state(game, {"agent": params}, jax.random.PRNGKey(1),
                               frozen={"reference": jax.tree.map(jnp.copy, params),
                                       judges.JUDGE: reward.init_params(small, jax.random.PRNGKey(2))})
  batch, _ = _prompt_batch(2)
  with pytest.raises(reward.RewardModelError, match="128 token ids.*vocab_size is 272"):
    jax.jit(functools.partial(game_step.game_step, game))(state, batch)
