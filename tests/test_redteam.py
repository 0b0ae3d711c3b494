"""The red-team game: the attacker's problems read inside the step as the host reads them, the
answer key, the zero-sum judge (penalty, shared payoff of repeated problems) against a NumPy
computation, the attacker's behaviour log-probs in the record, and the stage from gin with its
end-of-stage figures (bad settings: test_cli)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gamejax import config, records, run, sharding, step as game_step
from gamejax.data.tokenizer import EOS, ByteTokenizer
from gamejax.games import arithmetic, redteam
from gamejax.models import llama
from gamejax.payoffs.kl import seat_token_logprobs
from gamejax.payoffs.base import Play
from gamejax.players import judges

EXP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
TOK = ByteTokenizer()


def _encode(texts, n):
  """``(int32[B, max(n, longest)], lengths)``: the texts' tokens, PAD after them."""
  rows = [list(TOK.encode(t)) for t in texts]
  n = max([n] + [len(r) for r in rows])
  return (np.asarray([r + [0] * (n - len(r)) for r in rows], np.int32),
          np.asarray([len(r) for r in rows], np.int32))


def test_problems_read_in_the_step_as_on_the_host_with_their_answer_keys():
  rng = np.random.default_rng(0)
  alphabet = list("0123456789+-=") + ["a", " "]
  texts = ["042+785=", "999+999=", "100-099=", "099-100=", "000-000=", "42+785=", "042+785",
           "042*785=", "0420+785", "042+785==", "+042785=", "042-785="]
  for _ in range(300):      # mostly well-formed, with random corruptions
    a, b, op = rng.integers(0, 1000), rng.integers(0, 1000), "+-"[rng.integers(2)]
    t = list(f"{a:03d}{op}{b:03d}=")
    if rng.random() < 0.3:
      t[rng.integers(len(t))] = alphabet[rng.integers(len(alphabet))]
    if rng.random() < 0.1:
      t = t[:rng.integers(1, len(t))]
    texts.append("".join(t))
  for ops in (("+", "-"), ("+",)):
    tokens, lengths = _encode(texts, 8)
    valid, a, b, minus = jax.jit(redteam.parse_problems, static_argnums=(2, 3))(
        tokens, lengths, 3, ops)
    answers = np.where(np.asarray(minus), np.asarray(a) - np.asarray(b),
                       np.asarray(a) + np.asarray(b))
    keys = np.asarray(redteam.answer_keys(jnp.asarray(answers)))
    seen_valid = seen_invalid = 0
    for i, text in enumerate(texts):
      want = redteam.host_problem(text, 3, ops)
      assert bool(valid[i]) == (want is not None), text
      if want is None:
        seen_invalid += 1
        continue
      seen_valid += 1
      assert (int(a[i]), int(b[i]), "-" if minus[i] else "+") == (want.a, want.b, want.op), text
      np.testing.assert_array_equal(keys[i], arithmetic.answer_digits(want.answer,
                                                                       judges.ANSWER_WIDTH))
    assert seen_valid > 100 and seen_invalid > 50
  big = np.asarray([0, 7, 10, 999_999_999, 1_999_999_998])
  np.testing.assert_array_equal(np.asarray(redteam.answer_keys(jnp.asarray(big))),
                                [arithmetic.answer_digits(int(x), judges.ANSWER_WIDTH) for x in big])


def _judged(game, problems, answers_per_problem, valid):
  """The judge's output on hand-written answers (``G`` per problem) to known problems."""
  g = game.group_size
  answers = [t for group in answers_per_problem for t in group]
  n = 40
  completion = np.zeros((len(answers), n), np.int32)
  for i, t in enumerate(answers):
    ids = list(TOK.encode(t)) + [EOS]
    completion[i, :len(ids)] = ids
  key = np.stack([arithmetic.answer_digits(p.answer, judges.ANSWER_WIDTH) for p in problems])
  problem_tokens, _ = _encode([p.question_text(3) for p in problems], 8)
  rep = lambda x: np.repeat(np.asarray(x), g, axis=0)
  facts = {"completion": jnp.asarray(completion), judges.ANSWER_KEY: jnp.asarray(rep(key)),
           "redteam/valid": jnp.asarray(rep(valid)), "redteam/problem": jnp.asarray(
               rep(problem_tokens)),
           "redteam/minus": jnp.asarray(rep([p.op == "-" for p in problems])),
           "redteam/random": jnp.zeros((len(answers),), bool),
           "redteam/ones_carry": jnp.asarray(rep([p.op == "+" and p.a % 10 + p.b % 10 >= 10
                                                  for p in problems]))}
  moves = records.GameRecord(*(jnp.zeros((len(answers), 4), jnp.int32),) * 4)
  return game.respond_fn(259)(None, moves, facts, None)


@pytest.mark.parametrize("share", [True, False])
def test_judge_pays_the_attacker_the_defenders_loss_shared_among_copies_and_penalises(share):
  game = redteam.RedTeamGame(group_size=2, penalty=0.7, share=share)
  P = arithmetic.Problem
  problems = [P(12, 34, "+"), P(12, 34, "+"), P(57, 68, "+"), P(500, 1, "-"), P(12, 34, "+")]
  valid = [True, True, True, True, False]          # the last: an ill-formed move, say
  answers = [["46", "46"], ["46", "45"], ["115", "125"], ["|499", "x"], ["46", "46"]]
  out = _judged(game, problems, answers, valid)
  right = np.asarray([[1, 1], [1, 0], [0, 1], [1, 0], [0, 0]], np.float64)
  np.testing.assert_allclose(np.asarray(out["agent/rewards"]), right.reshape(-1))
  loss = 1.0 - right.mean(axis=1)
  copies = np.asarray([2, 2, 1, 1, 1]) if share else np.ones(5)
  attack = np.where(valid, loss / copies, -0.7)
  np.testing.assert_allclose(np.asarray(out["opponent/rewards"]), np.repeat(attack, 2), rtol=1e-6)
  m = {k: float(v) for k, v in out["metrics"].items()}
  assert m["redteam/valid"] == pytest.approx(0.8)
  assert m["redteam/distinct"] == pytest.approx((0.5 + 0.5 + 1 + 1) / 5)
  assert m["redteam/defender_exact"] == pytest.approx(right[:4].mean())
  assert m["redteam/ones_carry"] == pytest.approx(0.25) and m["redteam/minus"] == pytest.approx(.25)


CFG = llama.LlamaConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64)


def test_the_record_carries_the_attackers_move_with_its_sampling_logprobs():
  """Rows: <BOS> + problem (the opponent's tokens) + answer (the agent's), G rows per problem; the
  behaviour log-probs at the problem's tokens are the attacker's own at its temperature (the
  first update's importance ratio is 1), its answer key the problem's."""
  game = redteam.RedTeamGame(group_size=2, attacker_temperature=1.5, defender_temperature=0.7)
  keys = jax.random.split(jax.random.PRNGKey(0))
  params = {"d": llama.init_params(CFG, keys[0]), "a": llama.init_params(CFG, keys[1])}
  state = game_step.GameState(params=params, opt_state={}, frozen={}, rng=None, step=None)
  apply = lambda params, *xs: llama.apply(CFG, params, *xs)
  play = game.play_fn(apply, {"agent": "d", "opponent": "a"}, game_step.player_params, model=CFG)
  moves, facts = jax.jit(play)(state, {"games": jnp.zeros((6,), jnp.int32)}, jax.random.PRNGKey(3))
  assert moves.opening == 0          # the problems are the attacker's moves: nothing skipped
  tokens, players = np.asarray(moves.tokens), np.asarray(moves.players)
  assert tokens.shape[0] == 12
  texts = []
  for row in range(12):
    real = np.asarray(moves.segment_ids[row]) > 0
    who, moved = players[row][real], tokens[row][real]
    n_opp = int((who == records.OPPONENT).sum())
    assert (who[:n_opp] == records.OPPONENT).all() and (who[n_opp:] == records.AGENT).all()
    texts.append(TOK.decode(moved[1:n_opp]))
    problem = redteam.host_problem(texts[-1], 3)
    assert bool(facts["redteam/valid"][row]) == (problem is not None)
    if problem is not None:
      np.testing.assert_array_equal(facts[judges.ANSWER_KEY][row], arithmetic.answer_digits(
          problem.answer, judges.ANSWER_WIDTH))
  assert texts[0::2] == texts[1::2]            # the G answers of a game share its problem
  for seat, who, temperature in (("opponent", "a", 1.5), ("agent", "d", 0.7)):
    scored = lambda p, *xs, t=temperature: llama.apply(CFG, p, *xs) / t
    logp, mask = seat_token_logprobs(params[who], Play(scored, moves, {}, None), seat)
    behaviour = np.asarray(facts["behaviour_logprobs"])
    on = np.asarray(mask) > 0
    assert on.sum() > 0
    np.testing.assert_allclose(behaviour[on], np.asarray(logp)[on], atol=2e-4)


def test_redteam_stage_from_gin_trains_both_seats_and_reports_its_figures(tmp_path):
  """experiments/arithmetic/redteam.gin's last stage (tiny model, earlier stages' params given):
  both learners change, the judge's figures are logged, the summary compares the defenders on
  the attacker's problems and on held-out ones, and a restore reads the frozen players back."""
  config.parse([f"{EXP}/arithmetic/redteam.gin", f"{EXP}/models/tiny.gin"],
               ["redteam/Stage.steps=2", "Stage.steps_per_call=2", "GROUP_SIZE=2",
                "redteam/Stage.batch_size=4", "redteam_game.eval_problems=6",
                "eval/arena.num_test=6", "Evaluation.num_examples=6", "Evaluation.batch_size=6",
                f"Experiment.data_dir='{tmp_path / 'data'}'"])
  exp = config.build_experiment()
  exp.validate()
  index = len(exp.stages) - 1
  cfg = exp.model
  start = {name: {"agent": llama.init_params(cfg, jax.random.PRNGKey(i))}
           for i, name in enumerate(("pretrain", "sft", "grpo"))}
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  work = str(tmp_path / "run")
  result = run.run_stage(exp, index, start, work, mesh, progress=False,
                         eval_examples=run.load_eval_examples(exp), log=lambda _: None)
  m = result.metrics
  assert m["skipped_nonfinite"] == 0 and sorted(m["players"]) == ["attacker", "defender"]
  assert sorted(m["defenders"]) == ["control", "defender", "initial"]
  assert m["attack"]["written"] == 6 and 0.0 <= m["attack"]["valid"] <= 1.0
  assert m["accuracy"] == m["defenders"]["defender"]["heldout"]
  for who, was in (("defender", "sft"), ("attacker", "pretrain")):
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), result.params[who],
                         start[was]["agent"])
    assert max(jax.tree.leaves(moved)) > 0, who
  row = json.loads(open(os.path.join(work, "metrics.jsonl")).readline())
  assert {"redteam/valid", "redteam/distinct", "redteam/defender_exact", "attacker/pg/reward_mean",
          "defender/kl", "attacker/kl/kl"} <= set(row), sorted(row)
  params, frozen = run.restore_players(exp, index, work)
  for name, source in (("defender_start", "sft"), ("attacker_start", "pretrain"),
                       ("control", "grpo")):
    jax.tree.map(np.testing.assert_array_equal, frozen[name], start[source]["agent"])
  jax.tree.map(np.testing.assert_array_equal, params, result.params)


def test_drawn_problems_follow_the_arenas_distribution_and_are_chances_moves():
  drawn = np.asarray(redteam.random_problems(jax.random.PRNGKey(0), 4000, 3))
  problems = [redteam.host_problem(TOK.decode(row), 3) for row in drawn]
  assert all(p is not None for p in problems)            # well-formed, in range
  rng = np.random.default_rng(0)
  host = [arithmetic._random_problem(rng, arithmetic.ArenaConfig()) for _ in range(4000)]
  for stat in (lambda p: p.op == "-", lambda p: len(str(max(p.a, p.b))) == 3,
               lambda p: p.a < 10, lambda p: p.op == "+" and p.a % 10 + p.b % 10 >= 10):
    assert abs(np.mean([stat(p) for p in problems]) - np.mean([stat(p) for p in host])) < 0.03
  game = redteam.RedTeamGame(group_size=2, random_fraction=0.5)
  params = {"d": llama.init_params(CFG, jax.random.PRNGKey(1)),
            "a": llama.init_params(CFG, jax.random.PRNGKey(2))}
  state = game_step.GameState(params=params, opt_state={}, frozen={}, rng=None, step=None)
  play = game.play_fn(None, {"agent": "d", "opponent": "a"}, game_step.player_params, model=CFG)
  moves, facts = jax.jit(play)(state, {"games": jnp.zeros((4,), jnp.int32)}, jax.random.PRNGKey(3))
  players = np.asarray(moves.players)
  drawn_rows = np.asarray(facts["redteam/random"])
  assert drawn_rows.tolist() == [False] * 4 + [True] * 4
  assert not (players[drawn_rows] == records.OPPONENT).any()
  assert (players[drawn_rows] == records.CHANCE).sum(axis=1).tolist() == [9] * 4   # <BOS> + 8
  assert (players[~drawn_rows] == records.OPPONENT).any(axis=1).all()
  assert np.asarray(facts["redteam/valid"])[drawn_rows].all()
  out = game.respond_fn(CFG.vocab_size)(state, moves, facts, None)
  attack = np.asarray(out["opponent/rewards"])
  np.testing.assert_allclose(attack[drawn_rows], attack[~drawn_rows].mean(), rtol=1e-6)
