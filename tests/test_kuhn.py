"""Kuhn poker: the exact exploitability against OpenSpiel's (fixed, random, Nash and league
policies), the language game's play and judge, MMD on its multi-decision records against a NumPy
reference, the compiled two-learner step, and the experiment from gin with its policy export."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pyspiel
import pytest
from open_spiel.python import policy as os_policy
from open_spiel.python.algorithms import exploitability as os_exploitability
from open_spiel.python.games import data as os_data

from gamejax import records, sharding, step as game_step
from gamejax.games import base as games_base, kuhn
from gamejax.models import llama
from gamejax.payoffs import Play, mmd
from gamejax.players import selfplay

GAME = pyspiel.load_game("kuhn_poker")


def _openspiel(policy):
  tabular = os_policy.TabularPolicy(GAME)
  for state, row in tabular.state_lookup.items():
    tabular.action_probability_array[row] = policy[state]
  return os_exploitability.exploitability(GAME, tabular)


def _from_openspiel(os_pol):
  """{information state: [p(pass), p(bet)]} of an OpenSpiel policy."""
  out = {}
  for state, pairs in os_pol.policy_table().items():
    probs = [0.0, 0.0]
    for action, p in pairs:
      probs[action] = p
    out[state] = probs
  return out


def test_information_states_are_openspiels():
  assert sorted(kuhn.ALL_INFO_STATES) == sorted(os_policy.TabularPolicy(GAME).state_lookup)


FIXED = {"uniform": kuhn.uniform_policy(),
         "always_pass": {s: [1.0, 0.0] for s in kuhn.ALL_INFO_STATES},
         "always_bet": {s: [0.0, 1.0] for s in kuhn.ALL_INFO_STATES}}


@pytest.mark.parametrize("name", sorted(FIXED))
def test_fixed_policies_match_openspiel(name):
  np.testing.assert_allclose(kuhn.exploitability(FIXED[name]), _openspiel(FIXED[name]), atol=1e-9)
  if name == "uniform":
    np.testing.assert_allclose(kuhn.exploitability(FIXED[name]), 0.458333, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_random_policies_match_openspiel(seed):
  rng = np.random.default_rng(seed)
  policy = {s: list(rng.dirichlet([0.5, 0.5])) for s in kuhn.ALL_INFO_STATES}
  np.testing.assert_allclose(kuhn.exploitability(policy), _openspiel(policy), atol=1e-9)


@pytest.mark.parametrize("alpha", [0.0, 1 / 6, 1 / 3])
def test_openspiels_nash_policies_have_zero_exploitability(alpha):
  nash = _from_openspiel(os_data.kuhn_nash_equilibrium(alpha))
  assert abs(kuhn.exploitability(nash)) < 1e-9
  mine = kuhn.nash_policy(alpha)
  for state in kuhn.ALL_INFO_STATES:
    np.testing.assert_allclose(mine[state], nash[state], atol=1e-12, err_msg=state)


def test_bad_policies_are_refused():
  with pytest.raises(kuhn.PolicyError, match="no probabilities"):
    kuhn.exploitability({"0": [0.5, 0.5]})
  bad = dict(kuhn.uniform_policy(), **{"1pb": [0.7, 0.7]})
  with pytest.raises(kuhn.PolicyError, match="1pb"):
    kuhn.exploitability(bad)


def test_written_policy_reads_back_and_a_bad_one_is_not_written(tmp_path):
  import json
  path = tmp_path / "policy.json"
  kuhn.write_policy(str(path), kuhn.nash_policy(0.1))
  back = json.load(open(path))
  assert kuhn.exploitability(back) < 1e-9 and _openspiel(back) < 1e-9
  bad = dict(kuhn.uniform_policy(), **{"2b": [0.2, 0.2]})
  with pytest.raises(kuhn.PolicyError):
    kuhn.write_policy(str(tmp_path / "bad.json"), bad)
  assert not (tmp_path / "bad.json").exists() and not (tmp_path / "bad.json.tmp").exists()


# ---- the vectorised evaluator (logged inside the step) ------------------------------------------

def _random_policy(rng):
  return {s: list(rng.dirichlet([0.5, 0.5])) for s in kuhn.ALL_INFO_STATES}


@pytest.mark.parametrize("seed", range(4))
def test_table_exploitability_matches_the_tree_walk_and_openspiel(seed):
  policy = _random_policy(np.random.default_rng(100 + seed))
  table = kuhn.policy_table(policy)
  want = _openspiel(policy)
  np.testing.assert_allclose(kuhn.table_exploitability(table), want, atol=1e-12)
  np.testing.assert_allclose(kuhn.exploitability(policy), want, atol=1e-12)
  got32 = jax.jit(kuhn.table_exploitability)(jnp.asarray(table, jnp.float32))
  np.testing.assert_allclose(float(got32), want, rtol=1e-5)


def test_a_leagues_behaviour_policy_is_its_mixed_strategy():
  """Kuhn's theorem: a league that draws member k for a whole game plays like the behaviour
  policy league_table gives, against any opponent, in either seat."""
  rng = np.random.default_rng(7)
  tables = np.stack([kuhn.policy_table(_random_policy(rng)) for _ in range(3)])
  weights = np.array([0.5, 0.3, 0.2])
  other = kuhn.policy_table(_random_policy(rng))
  mixed = kuhn.league_table(tables, weights)
  got32 = kuhn.league_table(jnp.asarray(tables), jnp.asarray(weights))
  np.testing.assert_allclose(np.asarray(got32), mixed, rtol=1e-5)
  for seat, rows in kuhn.ROWS.items():
    def value(table):
      profile = other.copy()
      profile[rows] = table[rows]
      return kuhn.expected_value(kuhn.table_policy(profile))
    np.testing.assert_allclose(value(mixed), sum(w * value(t) for w, t in zip(weights, tables)),
                               atol=1e-12, err_msg=seat)


# ---- the language game ---------------------------------------------------------------------------

CFG = llama.LlamaConfig(vocab_size=272, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64)
POKER = kuhn.kuhn_poker()


def test_transcripts_are_each_seats_view():
  detok = lambda ids: "".join(chr(t - 3) for t in ids[1:])
  assert [detok(kuhn.transcript(s)) for s in ("0", "2pb", "1p", "0b")] == \
      ["1J", "1Kpb", "2Qp", "2Jb"]
  assert all(kuhn.transcript(s)[0] == 1 for s in kuhn.ALL_INFO_STATES)     # <BOS>


def test_play_deals_samples_each_seat_from_its_model_and_scores_what_it_played():
  """Two different models in the two seats, 12000 sampled games: the layout and attribution of
  each row, behaviour log-probs equal to the masked model's on the record (what payoffs score),
  move and chip frequencies matching the exact policy and value, the judge zero-sum."""
  apply = POKER.mask(functools.partial(llama.apply, CFG), CFG.vocab_size)
  params = {"a": llama.init_params(CFG, jax.random.PRNGKey(0)),
            "b": llama.init_params(CFG, jax.random.PRNGKey(1))}
  state = game_step.GameState(params=params, opt_state={}, frozen={}, rng=None, step=None)
  play = POKER.play_fn(apply, {"agent": "a", "opponent": "b"}, game_step.player_params)
  n = 12000
  moves, facts = jax.jit(play)(state, {"games": jnp.zeros((n,), jnp.int32)}, jax.random.PRNGKey(3))
  judgments = POKER.respond_fn(CFG.vocab_size)(state, moves, facts, None)
  tokens, players = np.asarray(moves.tokens), np.asarray(moves.players)
  text = ["".join(chr(t - 3) if t > 2 else "." for t in row) for row in tokens[:2000]]
  C, A, O, N = records.CHANCE, records.AGENT, records.OPPONENT, records.NOBODY
  for row, who in zip(text, players[:2000]):
    assert row[1] == "2" and row[6] == "1" and row[2] in "JQK" and row[7] in "JQK"
    assert row[2] != row[7] and row[3] == row[8] and row[3] + row[4] in ("pp", "pb", "bp", "bb")
    third = row[3:5] == "pb"
    assert row[9:] == (row[4] + row[10] if third else "..")
    assert list(who) == [C, C, C, C, O, C, C, C, A] + ([C, A] if third else [N, N])
  # What the step sampled from is what the masked model says on the record itself.
  @jax.jit
  def score(p):
    logp = jax.nn.log_softmax(apply(p, moves.tokens, moves.positions, moves.segment_ids), -1)
    return jnp.take_along_axis(logp, records.next_tokens(moves)[..., None], -1)[..., 0]
  scored = {"agent": np.asarray(score(params["a"])), "opponent": np.asarray(score(params["b"]))}
  behaviour = np.asarray(facts["behaviour_logprobs"])
  for seat in records.SEATS:
    mask = np.asarray(records.next_token_weights(moves, (seat,))) > 0
    assert mask.sum() >= n
    np.testing.assert_allclose(behaviour[mask], scored[seat][mask], rtol=1e-4, atol=1e-5)
  assert (behaviour[~(np.asarray(records.next_token_weights(moves, records.SEATS)) > 0)] == 0).all()
  # Frequencies: the agent's first move with each card, and the chips won on average.
  profile = POKER.profile(apply, {"agent": params["a"], "opponent": params["b"]})
  for card, ch in enumerate("JQK"):
    dealt = tokens[:, 7] == kuhn.token(ch)
    assert abs(dealt.mean() - 1 / 3) < 0.02
    bet = (tokens[dealt, 8] == kuhn.token("b")).mean()
    assert abs(bet - profile[str(card)][1]) < 0.04          # ~4 standard errors
  chips = np.asarray(facts["chips"], np.float64)
  value = kuhn.expected_value(profile)
  assert abs(chips.mean() - value) < 4 * chips.std() / np.sqrt(n)
  np.testing.assert_array_equal(judgments["agent/rewards"], facts["chips"])
  np.testing.assert_array_equal(judgments["opponent/rewards"], -facts["chips"])
  evaluated = POKER.evaluate(apply, {"agent": params["a"], "opponent": params["b"]})
  np.testing.assert_allclose(float(facts["metrics"]["exploitability"]),
                             evaluated["exploitability"], rtol=1e-4)
  np.testing.assert_allclose(evaluated["exploitability"], _openspiel(profile), atol=1e-12)
  assert abs(evaluated["seats"]["agent"]["value"] - value) < 1e-12


def test_a_scripted_seat_plays_its_table():
  """A model against the scripted player 'nash:0.2': the scripted seat's moves follow its table
  (bets with a Q after a bet: alpha + 1/3 of the time), its behaviour log-probs are the table's,
  and the exact evaluation sees the table."""
  apply = POKER.mask(functools.partial(llama.apply, CFG), CFG.vocab_size)
  scripted = games_base.scripted("nash:0.2").value(POKER, "agent")
  state = game_step.GameState(params={"b": llama.init_params(CFG, jax.random.PRNGKey(1))},
                              opt_state={}, frozen={"agent": scripted}, rng=None, step=None)
  play = POKER.play_fn(apply, {"agent": "agent", "opponent": "b"}, game_step.player_params)
  n = 12000
  moves, facts = jax.jit(play)(state, {"games": jnp.zeros((n,), jnp.int32)}, jax.random.PRNGKey(4))
  tokens, behaviour = np.asarray(moves.tokens), np.asarray(facts["behaviour_logprobs"])
  want = kuhn.nash_policy(0.2)
  for card, ch in enumerate("JQK"):
    first = tokens[:, 7] == kuhn.token(ch)
    bet = tokens[first, 8] == kuhn.token("b")
    assert abs(bet.mean() - want[str(card)][1]) < 0.03
    played = np.where(bet, want[str(card)][1], want[str(card)][0])
    np.testing.assert_allclose(np.exp(behaviour[first, 7]), played, atol=1e-6)
  faced = (tokens[:, 7] == kuhn.token("Q")) & (tokens[:, 9] == kuhn.token("b"))
  assert abs((tokens[faced, 10] == kuhn.token("b")).mean() - (0.2 + 1 / 3)) < 0.05
  evaluated = POKER.evaluate(apply, {"agent": scripted, "opponent": state.params["b"]})
  for s_ in kuhn.INFO_STATES[0]:
    np.testing.assert_allclose(evaluated["seats"]["agent"]["policy"][s_], want[s_], atol=1e-6)


def test_scripted_policies_and_their_errors(tmp_path):
  np.testing.assert_array_equal(POKER.scripted_policy("always_bet", "opponent")[:, 1], 1.0)
  np.testing.assert_allclose(POKER.scripted_policy("nash", "agent"),
                             kuhn.policy_table(kuhn.nash_policy(0.0)))
  path = tmp_path / "policy.json"
  kuhn.write_policy(str(path), kuhn.nash_policy(1 / 3))
  np.testing.assert_allclose(POKER.scripted_policy(str(path), "agent"),
                             kuhn.policy_table(kuhn.nash_policy(1 / 3)))
  for bad, message in [("nash:0.5", "alpha=0.5 must be in"), ("bluff", "expected one of"),
                       (str(tmp_path / "none.json"), "No such file"),
                       ({"0": [1.0, 0.0]}, "no probabilities for information states")]:
    with pytest.raises(kuhn.GameConfigError, match=message):
      POKER.scripted_policy(bad, "opponent")


# ---- MMD on multi-decision rows against a NumPy reference ----------------------------------------

V = 128
MOVE_IDS = [kuhn.token(c) for c in "pb"]
CONTEXT_IDS = [kuhn.token(c) for c in "JQKpb"]        # the tokens a decision follows
BIGRAM = POKER.mask(lambda params, tokens, positions, segment_ids: params[tokens], V)


def np_kuhn_mmd(table, moves, rewards, seat, alpha, magnet, baseline=None):
  """Per row: (r - b) * sum of log pi(move | previous token) over the seat's moves, minus
  alpha * KL(pi || rho) at each of them (pi, rho softmaxes over pass/bet); mean over rows. ``b``
  is the batch mean, or the given role baseline."""
  pid = {"agent": records.AGENT, "opponent": records.OPPONENT}[seat]
  def policy(t, prev):
    z = t[prev, MOVE_IDS].astype(np.float64)
    z = np.exp(z - z.max())
    return z / z.sum()
  r = rewards.astype(np.float64)
  total = 0.0
  for i in range(len(r)):
    for t in range(1, moves.tokens.shape[1]):
      if moves.players[i, t] != pid:
        continue
      prev, move = moves.tokens[i, t - 1], MOVE_IDS.index(moves.tokens[i, t])
      pi, rho = policy(table, prev), policy(magnet, prev)
      b = r.mean() if baseline is None else baseline
      total += (r[i] - b) * np.log(pi[move]) - alpha * np.sum(pi * np.log(pi / rho))
  return total / len(r)


@functools.lru_cache(maxsize=None)
def _bigram_games():
  """12 games played by a random bigram model in both seats, judged; and a magnet table."""
  rng = np.random.default_rng(11)
  table = rng.normal(size=(V, V)).astype(np.float32)
  magnet = rng.normal(size=(V, V)).astype(np.float32)
  state = game_step.GameState(params={"p": jnp.asarray(table)}, opt_state={}, frozen={}, rng=None,
                              step=None)
  play_fn = POKER.play_fn(BIGRAM, {"agent": "p", "opponent": "p"}, game_step.player_params)
  moves, facts = jax.jit(play_fn)(state, {"games": jnp.zeros((12,), jnp.int32)},
                                  jax.random.PRNGKey(5))
  return table, magnet, moves, POKER.respond_fn(V)(state, moves, facts, None)


@pytest.mark.parametrize("seat, alpha, role", [("agent", 0.3, False), ("opponent", 0.7, True),
                                               ("agent", 0.0, True)])
def test_mmd_on_kuhn_games_matches_numpy_value_and_gradient(seat, alpha, role):
  """MMD's sampled estimator on records where a seat decides once or twice, with the batch-mean
  baseline or a role baseline (SPIRAL's role-conditioned advantages)."""
  table, magnet, moves, judgments = _bigram_games()
  np_moves = jax.tree.map(np.asarray, moves)
  assert (np_moves.players == records.AGENT).sum(1).max() == 2        # some rows decide twice
  baselines = {"agent": 0.37, "opponent": -0.61}
  frozen = {"magnet": jnp.asarray(magnet), "roles": {k: jnp.asarray(v) for k, v in baselines.items()}}
  play = Play(BIGRAM, moves, judgments, jax.random.PRNGKey(0), frozen)
  payoff = mmd(seat, alpha=alpha, magnet="magnet", baseline="role" if role else "batch_mean")
  assert payoff.frozen_players == (("magnet", "roles") if role else ("magnet",))
  value, grad = jax.jit(jax.value_and_grad(lambda t: payoff(t, play)[0]))(jnp.asarray(table))
  rewards = np.asarray(judgments[f"{seat}/rewards"])
  reference = lambda t: np_kuhn_mmd(t, np_moves, rewards, seat, alpha, magnet.astype(np.float64),
                                    baselines[seat] if role else None)
  np.testing.assert_allclose(float(value), reference(table), rtol=1e-5, atol=1e-6)
  grad = np.asarray(grad)
  fd = np.zeros_like(grad, np.float64)
  for i in CONTEXT_IDS:
    for j in MOVE_IDS:
      up, down = table.astype(np.float64), table.astype(np.float64)
      up[i, j] += 1e-6
      down[i, j] -= 1e-6
      fd[i, j] = (reference(up) - reference(down)) / 2e-6
  assert np.abs(fd).max() > 1e-2
  np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=2e-5)     # zero off the decisions too


# ---- the compiled step and the experiment from gin ------------------------------------------------

def _kuhn_step(mesh):
  """Two learners (one per seat, the opponent's seat a league of the opponent's snapshots, each
  with its role baseline), compiled for ``mesh``: ``(g, apply, fn, state, batches, traces)``."""
  apply = POKER.mask(functools.partial(llama.apply, CFG), CFG.vocab_size)
  learners = {s: game_step.Learner(apply, mmd(s, alpha=0.2, baseline="role"), optax.adam(3e-3))
              for s in records.SEATS}
  followers = {"past": selfplay.league("opponent", size=3, every=2),
               "roles": selfplay.role_baselines(decay=0.8)}
  params = {s: llama.init_params(CFG, jax.random.PRNGKey(i)) for i, s in enumerate(records.SEATS)}
  seats = {"agent": "agent", "opponent": "past"}
  keeper = selfplay.follow(followers)
  g = game_step.Game(learners=learners, play=POKER.play_fn(apply, seats, game_step.player_params),
                     respond=POKER.respond_fn(CFG.vocab_size), after=keeper.after)
  state = game_step.init_state(g, params, jax.random.PRNGKey(7),
                               selfplay.init_followers(followers, params))
  traces = []
  fn, shardings = game_step.make_step(g, mesh, jax.eval_shape(lambda: state),
                                      on_trace=lambda: traces.append(1))
  batches = {"games": np.zeros((3, 64), np.int32)}
  return g, apply, fn, jax.device_put(state, shardings), batches, traces


def run_on(mesh):
  """Two calls of the two-learner league step on ``mesh``: the losses and the final params."""
  _, _, fn, state, batches, _ = _kuhn_step(mesh)
  losses = []
  for _ in range(2):
    state, metrics = fn(state, batches)
    losses.append(np.stack([np.asarray(metrics[f"{s}/loss"]) for s in records.SEATS]))
  return np.concatenate(losses, axis=1), jax.device_get(state.params)


def test_kuhn_on_eight_devices_matches_one_device():
  import eight_devices
  eight_devices.assert_eight_devices_match_one("test_kuhn")


def test_kuhn_in_the_compiled_step_two_learners_and_a_league_trace_once():
  """Two learners play, are judged and updated in one compiled step, traced once; the role
  baselines are the EMAs of the logged rewards; the logged exploitability is the exact one of
  the seated policies (the league's as its mixed strategy)."""
  g, apply, fn, state, batches, traces = _kuhn_step(sharding.make_mesh(devices=jax.devices()[:1]))
  before = jax.device_get(state.params)
  rewards = []
  for _ in range(2):
    state, metrics = fn(state, batches)
    rewards += np.asarray(metrics["judge/agent_reward"]).tolist()
  assert len(traces) == 1 and int(state.step) == 6
  baseline = 0.0                                # the role baselines: EMAs of each seat's rewards
  for r in rewards:
    baseline = 0.8 * baseline + 0.2 * r
  roles = jax.device_get(state.frozen["roles"])
  np.testing.assert_allclose([roles["agent"], roles["opponent"]], [baseline, -baseline],
                             rtol=1e-5, atol=1e-7)
  after = jax.device_get(state.params)
  for s in records.SEATS:
    assert not np.allclose(before[s]["embedding"], after[s]["embedding"]), s
  assert int(state.frozen["past"]["count"]) == 4             # the initial member + steps 2, 4, 6
  assert {"agent/loss", "opponent/loss", "exploitability", "play/bet_rate"} <= set(metrics)
  # One more play from this state: its logged exploitability is the evaluator's.
  _, facts = jax.jit(g.play)(state, {"games": jnp.zeros((8,), jnp.int32)}, jax.random.PRNGKey(0))
  seated = {"agent": state.params["agent"], "opponent": state.frozen["past"]}
  np.testing.assert_allclose(float(facts["metrics"]["exploitability"]),
                             POKER.evaluate(apply, seated)["exploitability"], rtol=1e-4)


MMD_GIN = os.path.join(os.path.dirname(__file__), "..", "experiments", "kuhn", "mmd.gin")


def test_kuhn_experiment_runs_from_gin_and_exports_a_policy_openspiel_agrees_with(tmp_path,
                                                                                 capsys):
  from gamejax import cli
  work = tmp_path / "run"
  code = cli.main(["train", f"--gin_file={MMD_GIN}", f"--workdir={work}", "--no_progress",
                   "--gin.KUHN_STEPS=100", "--gin.selfplay/Stage.batch_size=128",
                   "--gin.selfplay/Stage.checkpoint_every=50"])
  assert code == 0, capsys.readouterr().err
  rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [50, 100]
  assert all(0 <= r["exploitability"] < 0.6 for r in rows)
  summary = json.load(open(work / "summary.json"))["selfplay"]
  assert set(summary["seats"]["agent"]["policy"]) == set(kuhn.INFO_STATES[0])
  capsys.readouterr()
  path = tmp_path / "policy.json"
  assert cli.main(["eval", f"--workdir={work}", "--player=agent",
                   f"--export_policy={path}"]) == 0
  out = json.loads(capsys.readouterr().out)["selfplay"]
  exported = json.load(open(path))
  assert sorted(exported) == sorted(kuhn.ALL_INFO_STATES)
  np.testing.assert_allclose(_openspiel(exported), summary["exploitability"], atol=1e-9)
  np.testing.assert_allclose(out["exploitability"], summary["exploitability"], atol=1e-12)
  assert cli.main(["eval", f"--workdir={work}", f"--export_policy={tmp_path}/no/dir.json"]) == 2
  assert "no such directory" in capsys.readouterr().err
  bad = tmp_path / "bad.gin"
  bad.write_text(f"include '{os.path.abspath(MMD_GIN)}'\nkuhn_poker.reward_scale = 0\n")
  assert cli.main(["train", f"--gin_file={bad}", f"--workdir={tmp_path}/bad"]) == 2
  assert "kuhn_poker.reward_scale=0" in capsys.readouterr().err
  assert not (tmp_path / "bad").exists()


def _np_win_probability(profile, cards, history=""):
  """A hand-written tree walk: the probability that the agent wins the pot."""
  if history in ("bp",):
    return 1.0
  if history == "pbp":
    return 0.0
  if history in ("pp", "pbb", "bb"):
    return float(cards[0] > cards[1])
  player = len(history) % 2
  probs = profile[f"{cards[player]}{history}"]
  return sum(probs[a] * _np_win_probability(profile, cards, history + "pb"[a]) for a in (0, 1))


def test_win_rates_are_exact():
  apply = POKER.mask(functools.partial(llama.apply, CFG), CFG.vocab_size)
  players = [llama.init_params(CFG, jax.random.PRNGKey(i)) for i in range(3)]
  rates = POKER.win_rates(apply, players)
  for i, j in [(0, 1), (2, 0), (1, 1)]:
    profile = POKER.profile(apply, {"agent": players[i], "opponent": players[j]})
    want = np.mean([_np_win_probability(profile, d) for d in kuhn.DEALS])
    np.testing.assert_allclose(rates[i, j], want, atol=1e-12)
  assert len({round(x, 6) for x in rates.ravel()}) > 3          # the players differ


def test_kuhn_best_response_to_a_scripted_player_from_gin(tmp_path, capsys):
  """experiments/kuhn/best_response.gin, shortened: against the scripted uniform player the
  learner's exact best-response gain falls and its winnings approach the best response's 0.5;
  the exported profile holds the scripted seat's uniform rows."""
  from gamejax import cli
  work = tmp_path / "run"
  gin_file = os.path.join(os.path.dirname(MMD_GIN), "best_response.gin")
  assert cli.main(["train", f"--gin_file={gin_file}", f"--workdir={work}", "--no_progress",
                   "--gin.KUHN_STEPS=150", "--gin.selfplay/Stage.batch_size=512"]) == 0, \
      capsys.readouterr().err
  rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
  gains = [r["best_response_gain/agent"] for r in rows]
  assert gains[-1] < 0.5 * gains[0] and gains[-1] < 0.1, gains
  summary = json.load(open(work / "summary.json"))["selfplay"]
  assert summary["seats"]["agent"]["value"] > 0.4
  assert kuhn.best_response_value(kuhn.uniform_policy(), 0) == 0.5
  path = tmp_path / "policy.json"
  assert cli.main(["eval", f"--workdir={work}", f"--export_policy={path}"]) == 0
  exported = json.load(open(path))
  for s_ in kuhn.INFO_STATES[1]:
    np.testing.assert_allclose(exported[s_], [0.5, 0.5], atol=1e-6)
