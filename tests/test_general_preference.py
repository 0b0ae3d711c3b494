"""General-preference games: SPPO's loss and gradient against a NumPy reference written from Wu et
al. (2024), group win rates against a loop, and the arena's pairwise judge against hand-graded
answers."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigram_reference import bigram_apply, np_next_token_logliks, np_token_logliks
from gamejax import records
from gamejax.data.tokenizer import EOS, ByteTokenizer
from gamejax.games import arithmetic
from gamejax.payoffs import Play, group_win_rates, sppo
from gamejax.players import judges

V, T, G, PROMPTS = 9, 10, 3, 2
TOK = ByteTokenizer()


@pytest.fixture
def batch():
  """PROMPTS prompts with G answers each (group-major rows), random win rates and reference."""
  rng = np.random.default_rng(3)
  rows = []
  for _ in range(PROMPTS):
    prompt = rng.integers(1, V, rng.integers(2, 4))
    for _ in range(G):
      answer = rng.integers(1, V, rng.integers(1, T - len(prompt) + 1))
      rows.append((np.concatenate([prompt, answer]).astype(np.int32),
                   np.array([records.OPPONENT] * len(prompt) + [records.AGENT] * len(answer),
                            np.int32)))
  record = records.from_transcripts(rows, T)
  table = rng.normal(size=(V, V)).astype(np.float32)
  ref_table = rng.normal(size=(V, V)).astype(np.float32)
  ref = np_next_token_logliks(ref_table, record.tokens, record.players, record.segment_ids,
                              (records.AGENT, records.OPPONENT)).astype(np.float32)
  win = rng.uniform(size=(PROMPTS * G,)).astype(np.float32)
  return record, table, ref, win


def _np_sppo(table, record, ref, win, eta):
  """Wu et al. (2024), eq. 3.6: mean over answers of (log pi(y|x)/pi_t(y|x) - eta (P - 1/2))^2,
  log-probs summed over the answer's tokens; ``ref`` per token (summed over the agent's here)."""
  logp, _ = np_token_logliks(table, record.tokens, record.players, record.segment_ids,
                             (records.AGENT,))
  agent_next = np.zeros_like(ref)
  players, segments = np.asarray(record.players), np.asarray(record.segment_ids)
  agent_next[:, :-1] = (players[:, 1:] == records.AGENT) & (segments[:, 1:] > 0)
  ref_sum = (np.asarray(ref, np.float64) * agent_next).sum(axis=1)
  return np.mean([(lp - r - eta * (w - 0.5)) ** 2 for lp, r, w in zip(logp, ref_sum, win)])


def _play(record, ref, win):
  judgments = {"reference_token_logprobs": jnp.asarray(ref), "agent/win_rates": jnp.asarray(win)}
  return Play(bigram_apply, jax.tree.map(jnp.asarray, record), judgments, jax.random.PRNGKey(0))


@pytest.mark.parametrize("eta", [0.5, 3.0])
def test_sppo_value_matches_numpy(batch, eta):
  record, table, ref, win = batch
  value, metrics = sppo(eta=eta, group_size=G)({"table": jnp.asarray(table)},
                                               _play(record, ref, win))
  want = _np_sppo(table, record, ref, win, eta)
  np.testing.assert_allclose(-float(value), want, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["target_mean"]), eta * np.mean(win - 0.5), rtol=1e-5)


def test_sppo_gradient_matches_finite_differences(batch):
  record, table, ref, win = batch
  play, payoff = _play(record, ref, win), sppo(eta=2.0, group_size=G)
  grad = jax.grad(lambda t: payoff({"table": t}, play)[0])(jnp.asarray(table, jnp.float32))
  rng, h = np.random.default_rng(0), 1e-4
  table64 = np.asarray(table, np.float64)
  for _ in range(6):
    i, j = rng.integers(V), rng.integers(V)
    up, down = table64.copy(), table64.copy()
    up[i, j] += h
    down[i, j] -= h
    numeric = -(_np_sppo(up, record, ref, win, 2.0) - _np_sppo(down, record, ref, win, 2.0)) / (2 * h)
    np.testing.assert_allclose(float(grad[i, j]), numeric, rtol=2e-3, atol=2e-4)


def test_sppo_is_zero_where_the_log_ratio_meets_its_target(batch):
  """At log pi/pi_t = eta (P - 1/2) for every answer the loss is 0 (SPPO's fixed point)."""
  record, table, _, win = batch
  logp, _ = np_token_logliks(table, record.tokens, record.players, record.segment_ids,
                             (records.AGENT,))
  # A reference whose agent-token log-probs sum to logp - eta (win - 1/2), put on one token.
  ref = np.zeros(record.tokens.shape, np.float32)
  players = np.asarray(record.players)
  for b in range(len(logp)):
    first = np.flatnonzero(players[b, 1:] == records.AGENT)[0]
    ref[b, first] = logp[b] - 1.5 * (win[b] - 0.5)
  value, _ = sppo(eta=1.5)({"table": jnp.asarray(table)}, _play(record, ref, win))
  assert abs(float(value)) < 1e-8 + 1e-5


def test_group_win_rates_leave_each_answer_out():
  prefs = np.random.default_rng(0).uniform(size=(5, 5))
  want = [np.mean([prefs[i, j] for j in range(5) if j != i]) for i in range(5)]
  np.testing.assert_allclose(np.asarray(group_win_rates(jnp.asarray(prefs))), want, rtol=1e-6)


def test_arena_pairwise_judge_prefers_right_answers_and_ties_at_half():
  problem = arithmetic.Problem(57, 68, "+")                        # 125
  texts = ["7+8+0=15;5+6+1=12|125", "7+8+0=15;5+6+0=11|115", "|125", "|124"]   # R, W, R, W
  width = 12
  completions = np.zeros((len(texts), 24), np.int32)
  for i, text in enumerate(texts):
    ids = list(TOK.encode(text)) + [EOS]
    completions[i, :len(ids)] = ids
  key = np.stack([arithmetic.answer_digits(problem.answer, width)] * len(texts))
  facts = {"completion": jnp.asarray(completions), judges.ANSWER_KEY: jnp.asarray(key)}
  moves = records.GameRecord(*(jnp.ones((len(texts), 4), jnp.int32),) * 4)
  judge = judges.pairwise_judge(judges.arena_preference(), group_size=2)
  out = judge(None, moves, facts, None)
  # Groups (R, W) and (R, W): the right answer wins its pair.
  np.testing.assert_allclose(np.asarray(out["agent/win_rates"]), [1.0, 0.0, 1.0, 0.0])
  np.testing.assert_allclose(np.asarray(out["agent/rewards"]), [1.0, 0.0, 1.0, 0.0])
  assert float(out["metrics"]["judge/antisymmetry"]) == 0.0
  four = judges.pairwise_judge(judges.arena_preference(), group_size=4)(None, moves, facts, None)
  # Each right answer beats two wrong ones and ties the other right one: (1 + 1 + 1/2) / 3.
  np.testing.assert_allclose(np.asarray(four["agent/win_rates"]), [5 / 6, 1 / 6, 5 / 6, 1 / 6],
                             rtol=1e-6)


def test_bad_sppo_settings():
  with pytest.raises(ValueError, match="eta must be > 0"):
    sppo(eta=0.0)
  with pytest.raises(ValueError, match="group_size must be >= 2"):
    sppo(group_size=1)
  with pytest.raises(ValueError, match="group_size >= 2"):
    judges.pairwise_judge(judges.arena_preference(), group_size=1)


def _styled(texts):
  completions = np.zeros((len(texts), 4), np.int32)
  for i, text in enumerate(texts):
    ids = list(TOK.encode(text)) + [EOS]
    completions[i, :len(ids)] = ids
  return {"completion": jnp.asarray(completions)}


def test_cyclic_preference_is_intransitive_and_unstyled_answers_lose():
  a, b, c = 0.4, 0.3, 0.1
  prefer = judges.cyclic_preference(("A", "B", "C"), (a, b, c))
  facts = _styled(["A1", "B", "C", "x", "A", "A", "x", "y"])
  moves = records.GameRecord(*(jnp.ones((8, 4), jnp.int32),) * 4)
  got = np.asarray(prefer(moves, facts, 4))
  want = np.array([[.5, .5 + a, .5 - c, 1.], [.5 - a, .5, .5 + b, 1.], [.5 + c, .5 - b, .5, 1.],
                   [0., 0., 0., .5]])
  np.testing.assert_allclose(got[0], want, rtol=1e-6)
  np.testing.assert_allclose(got[1], [[.5, .5, 1., 1.], [.5, .5, 1., 1.], [0., 0., .5, .5],
                                      [0., 0., .5, .5]], rtol=1e-6)
  out = judges.pairwise_judge(prefer, 4)(None, moves, facts, None)
  m = out["metrics"]
  np.testing.assert_allclose([float(m[f"style/p_{s}"]) for s in "ABC"], [3 / 8, 1 / 8, 1 / 8])
  np.testing.assert_allclose(float(m["style/p_unstyled"]), 3 / 8)
  x = judges.cyclic_equilibrium((a, b, c))
  tv = 0.5 * (np.abs(np.array([3 / 8, 1 / 8, 1 / 8]) - x).sum() + 3 / 8)
  np.testing.assert_allclose(float(m["style/distance"]), tv, rtol=1e-5)


@pytest.mark.parametrize("strengths", [(0.5, 0.5, 0.5), (0.5, 0.3, 0.2), (0.05, 0.4, 0.25)])
def test_cyclic_equilibrium_is_the_games_maxmin_strategy(strengths):
  """Against the equilibrium every style wins exactly 1/2, and it is the maxmin strategy that
  linear programming finds for the zero-sum game P - 1/2."""
  from gamejax.games import matrix
  x = judges.cyclic_equilibrium(strengths)
  p = judges.cyclic_matrix(strengths)
  np.testing.assert_allclose(p @ x, [0.5] * 3, atol=1e-12)
  np.testing.assert_allclose(matrix.maxmin_strategy(p - 0.5), x, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"strengths": (0.5, 0.6, 0.2)}, "strengths in (0, 1/2]"),
    ({"strengths": (0.5, 0.0, 0.2)}, "strengths in (0, 1/2]"),
    ({"strengths": (0.5, 0.2)}, "strengths in (0, 1/2]"),
    ({"styles": ("A", "A", "B")}, "3 different one-byte texts"),
    ({"styles": ("A", "BB", "C")}, "3 different one-byte texts"),
])
def test_bad_cyclic_preferences_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    judges.cyclic_preference(**kwargs)


def test_cyclic_sppo_experiment_refreshes_its_reference_each_iteration(tmp_path):
  import json
  import os
  from gamejax import config, run
  exp_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
  config.parse([f"{exp_dir}/arithmetic/cyclic_sppo.gin", f"{exp_dir}/models/tiny.gin"],
               ["sft/Stage.steps=2", "sft/Stage.batch_size=4", "sft/Stage.steps_per_call=2",
                "sppo/Stage.steps=6", "sppo/Stage.steps_per_call=2", "ITERATION_STEPS=4",
                "GROUP_SIZE=4", "sppo/Stage.batch_size=2", "sppo/arena.num_train=20",
                "sppo/arena.num_test=5", "EMA_DECAY=0.0",
                f"Experiment.data_dir='{tmp_path / 'data'}'"])
  exp = config.build_experiment()
  work = str(tmp_path / "run")
  run.run_experiment(exp, work, progress=False, log=lambda _: None)
  rows = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))
          if '"sppo"' in line]
  assert {"style/distance", "style/p_A", "agent/sppo/win_rate_mean", "judge/antisymmetry",
          "agent/probe/distance", "agent/probe/p_A"} <= set(rows[0]), sorted(rows[0])
  # The probe is the policy's exact mix: a distribution, its distance the equilibrium's.
  p = [rows[0][f"agent/probe/p_{c}"] for c in "ABC"] + [rows[0]["agent/probe/p_other"]]
  assert min(p) >= 0 and abs(sum(p) - 1) < 1e-5
  # Refreshed at step 4, not since: the reference is neither the final params nor the initial
  # (the styles stage's).
  final, frozen = run.restore_players(exp, 1, work)
  initial = jax.tree.leaves(run.restore_params(exp, 0, work)["agent"])
  reference = jax.tree.leaves(frozen["reference"])
  assert any(not np.allclose(r, f) for r, f in zip(reference, jax.tree.leaves(final["agent"])))
  assert any(not np.allclose(r, i) for r, i in zip(reference, initial))
  # The other follower, an EMA of decay 0, is kept after every step too: the final params.
  for e, f in zip(jax.tree.leaves(frozen["ema"]), jax.tree.leaves(final["agent"])):
    np.testing.assert_array_equal(e, f)


def test_a_preference_outside_zero_one_is_a_config_error_and_counted_in_the_step(tmp_path, capsys):
  """A judge's preference must be a probability: a gin-configured one that is not stops the run
  before it starts (exit 2, the setting named, no workdir); the step counts any such value."""
  import os
  import gin
  from gamejax import cli, config

  def doubled_preference(scale=2.0):
    inner = judges.arena_preference()
    return lambda moves, facts, group_size: scale * inner(moves, facts, group_size)

  config.register()
  with gin.unlock_config():
    gin.external_configurable(doubled_preference, module="tests")
  exp = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
  work = tmp_path / "run"
  code = cli.main(["train", f"--gin_file={exp}/arithmetic/sppo.gin",
                   "--gin.sppo/pairwise_judge.prefer=@doubled_preference()",
                   f"--workdir={work}"])
  err = capsys.readouterr().err
  assert code == 2 and "pairwise_judge.prefer=" in err and "in [0, 1]" in err, err
  assert "values from 0 to 2" in err and not work.exists()
  judge = judges.pairwise_judge(doubled_preference(1.5), group_size=2)
  completion = jnp.asarray([list(TOK.encode("7")) + [EOS]] * 2, jnp.int32)
  facts = {"completion": jnp.concatenate([completion, completion]),
           judges.ANSWER_KEY: jnp.asarray([arithmetic.answer_digits(7, judges.ANSWER_WIDTH),
                                           arithmetic.answer_digits(8, judges.ANSWER_WIDTH)] * 2)}
  facts[judges.ANSWER_KEY] = facts[judges.ANSWER_KEY][jnp.asarray([0, 1, 0, 1])]
  moves = records.GameRecord(*(jnp.zeros((4, 3), jnp.int32),) * 4)
  out = judge(None, moves, facts, None)
  assert float(out["metrics"]["judge/preference_out_of_range"]) == 2.0   # 1.5 * 1 twice
