"""An RL stage's sampler settings reach the step: it scores its moves at the sampler's temperature
(``Rollout.score_at_temperature``) -- the first update's importance ratio is 1 on every sampled
token, and the KL estimates are those of a NumPy reference computed from ``logits / temperature``
-- and its top-k / top-p filters reach the sampler."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gamejax import config, records, run, sampling, step as game_step
from gamejax.run import registry
from gamejax.data.prompts import PromptLoader
from gamejax.data.tokenizer import EOS
from gamejax.games import arithmetic
from gamejax.models import llama
from gamejax.payoffs import Play, grpo, kl_to_reference, ppo, weighted
from gamejax.payoffs.kl import seat_token_logprobs

CFG = llama.LlamaConfig(vocab_size=272, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64,
                        init_std=0.2)
GROUP, TEMPERATURE = 4, 2.0


def _experiment(payoff, player="policy", score=True, prepare=None):
  rollout = run.Rollout(group_size=GROUP, temperature=TEMPERATURE, max_new_tokens=10,
                        prompt_len=10, score_at_temperature=score)
  stage = run.Stage(name="rl", data=config.arena(max_digits=2), payoff=payoff, steps=1, steps_per_call=1,
                    batch_size=2, rollout=rollout, reference=True, player=player,
                    prepare=prepare)
  exp = run.Experiment(stages=[stage], model=CFG)
  exp.validate()
  return exp


def _batch():
  arena = arithmetic.ArenaConfig(max_digits=2)
  examples = [ex for _, ex in arithmetic.generate_examples(arena, "train", 2, 0,
                                                           [("perfect", 1.0)], True, False)]
  return next(PromptLoader(examples, 2, 10, seed=0, answer_width=run.ANSWER_WIDTH))


def _state(exp, game):
  """The stage's initial state, with a reference that differs from the policy."""
  kind = registry.MODELS[exp.stages[0].player]
  players = {"agent": kind.init(CFG, jax.random.PRNGKey(1),
                                llama.init_params(CFG, jax.random.PRNGKey(0)))}
  state = run.stage_state(exp, 0, game, players)
  other = llama.init_params(CFG, jax.random.PRNGKey(7))
  return state.replace(frozen={**state.frozen, "reference": other})


def _on_policy_ratio(exp):
  """exp(current - behaviour) log-probs on the agent's sampled tokens, under the stage's apply."""
  game = run.stage_game(exp, 0)
  state = _state(exp, game)
  moves, facts = jax.jit(game.play)(state, _batch(), jax.random.PRNGKey(3))
  learner = game.learners["agent"]
  logp_BT, mask_BT = jax.jit(lambda p: seat_token_logprobs(
      p, Play(lambda *a: _logits(learner.apply(*a)), moves, {}, jax.random.PRNGKey(0))))(
          state.params["agent"])
  on = np.asarray(mask_BT) > 0
  assert on.sum() > 20
  behaviour = np.asarray(facts["behaviour_logprobs"])[on]
  return np.exp(np.asarray(logp_BT)[on] - behaviour), behaviour


def _logits(out):
  return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("player", ["policy", "policy_value"])
def test_first_update_ratio_is_one_on_every_sampled_token(player):
  payoff = grpo(GROUP) if player == "policy" else ppo()
  ratio, behaviour = _on_policy_ratio(_experiment(payoff, player))
  np.testing.assert_allclose(ratio, 1.0, atol=2e-4)
  # Scored at temperature 1 (the explicit option), the same moves get other log-probs: those of a
  # policy that did not sample them (the ratio is 1 there too, against the wrong policy).
  ratio, untempered = _on_policy_ratio(_experiment(payoff, player, score=False))
  np.testing.assert_allclose(ratio, 1.0, atol=2e-4)
  assert np.abs(untempered - behaviour).max() > 0.05


def test_compiled_step_sees_ratio_one_and_no_clipping():
  # (PPO's actor-critic is checked token by token above; its step compiles slowly.)
  for payoff, player, prepare in ((grpo(GROUP, beta=0.04), "policy", None),):
    exp = _experiment(payoff, player, prepare=prepare)
    game = run.stage_game(exp, 0)
    state = _state(exp, game)
    _, metrics = jax.jit(functools.partial(game_step.game_step, game))(state, _batch())
    np.testing.assert_allclose(metrics["agent/ratio_mean"], 1.0, atol=2e-5)
    assert float(metrics["agent/clip_fraction"]) == 0.0


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _np_kl(exp, state, moves, estimator):
  """Mean per-agent-token KL estimate of ``KL(pi_T || ref_T)`` at the sampler's temperature, in
  NumPy from the two models' logits."""
  fwd = jax.jit(lambda p: llama.apply(CFG, p, moves.tokens, moves.positions, moves.segment_ids))
  tokens = np.asarray(moves.tokens)
  t = exp.stages[0].rollout.score_temperature
  logp = _np_log_softmax(np.asarray(fwd(state.params["agent"])) / t)
  ref = _np_log_softmax(np.asarray(fwd(state.frozen["reference"])) / t)
  mask = np.asarray(records.next_token_weights(moves, ("agent",))) > 0
  b, s = np.nonzero(mask)
  nxt = tokens[b, s + 1]
  log_ratio = ref[b, s, nxt] - logp[b, s, nxt]
  return {"k1": -log_ratio, "k3": np.exp(log_ratio) - log_ratio - 1.0}[estimator].mean()


@pytest.mark.parametrize("score", [True, False])
def test_kl_estimates_match_numpy_at_the_scoring_temperature(score):
  payoff = weighted({"grpo": (1.0, grpo(GROUP, beta=0.04)), "k3": (0.01, kl_to_reference("k3")),
                     "k1": (0.01, kl_to_reference("k1"))})
  exp = _experiment(payoff, score=score)
  game = run.stage_game(exp, 0)
  state = _state(exp, game)
  learner = game.learners["agent"]

  @jax.jit
  def score_moves(state, batch):
    """The stage's play and respond, then its payoff's metrics on what they gave."""
    k_play, k_respond = jax.random.split(jax.random.PRNGKey(3))
    moves, facts = game.play(state, batch, k_play)
    judgments = {**facts, **game.respond(state, moves, facts, k_respond)}
    _, metrics = learner.payoff(state.params["agent"],
                                Play(learner.apply, moves, judgments, jax.random.PRNGKey(0)))
    return moves, metrics

  moves, metrics = score_moves(state, _batch())
  metrics = {f"agent/{k}": v for k, v in metrics.items()}
  k3, k1 = _np_kl(exp, state, moves, "k3"), _np_kl(exp, state, moves, "k1")
  assert k3 > 1e-3
  np.testing.assert_allclose(metrics["agent/k3/kl"], k3, rtol=2e-4)
  np.testing.assert_allclose(metrics["agent/grpo/kl"], k3, rtol=2e-4)
  np.testing.assert_allclose(metrics["agent/k1/kl"], k1, rtol=2e-3, atol=1e-5)
  if score:     # at temperature 1 the estimate differs: the test sees which one the stage used
    other = _experiment(payoff, score=False)
    assert abs(_np_kl(other, state, moves, "k3") - k3) > 0.02 * k3


def test_rollout_top_k_and_top_p_reach_the_sampler():
  """At temperature 1 with top-k 1 (or a tiny nucleus) every completion is the greedy one;
  without either, the same rollout samples other answers."""
  def completions(**option):
    rollout = run.Rollout(group_size=GROUP, temperature=1.0, max_new_tokens=10, prompt_len=10,
                          **option)
    stage = run.Stage(name="rl", data=config.arena(max_digits=2), payoff=grpo(GROUP), steps=1,
                      steps_per_call=1, batch_size=2, rollout=rollout)
    game = run.stage_game(run.Experiment(stages=[stage], model=CFG), 0)
    return np.asarray(jax.jit(game.play)(state, batch, jax.random.PRNGKey(3))[1]["completion"])

  state = _state(_experiment(grpo(GROUP)), run.stage_game(_experiment(grpo(GROUP)), 0))
  batch = _batch()
  greedy = sampling.generate(CFG, state.params["agent"], jnp.asarray(batch["prompt"]),
                             jnp.asarray(batch["prompt_lengths"]), 10, jax.random.PRNGKey(0),
                             eos_id=EOS)
  want = np.repeat(np.asarray(greedy["tokens"]), GROUP, axis=0)
  np.testing.assert_array_equal(completions(top_k=1), want)
  np.testing.assert_array_equal(completions(top_p=1e-6), want)
  assert not np.array_equal(completions(), want)
