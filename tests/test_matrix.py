"""Matrix games as language games: exploitability against OpenSpiel, the MMD payoff against a
float64 NumPy reference (value and gradient), both seats sampled, judged and updated in one
compiled step, followers kept by the step, and bad game configs refused."""
import dataclasses
import functools
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pyspiel
import pytest
from open_spiel.python import policy as os_policy
from open_spiel.python.algorithms import exploitability as os_exploitability

import eight_devices
from gamejax import records, sharding, step as game_step
from gamejax.games import matrix
from gamejax.models import llama
from gamejax.payoffs import Play, mmd, reinforce
from gamejax.players import selfplay

CFG = llama.LlamaConfig(vocab_size=272, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64)
BIASED = [[0, -25, 50], [25, 0, -5], [-50, 5, 0]]


# ---- exploitability against OpenSpiel -------------------------------------------------------------

def _openspiel_nash_conv(a, b, x, y):
  k, l = a.shape
  game = pyspiel.create_matrix_game("m", "m", [str(i) for i in range(k)],
                                    [str(j) for j in range(l)], a.tolist(), b.tolist())
  game = pyspiel.convert_to_turn_based(game)
  policy = os_policy.TabularPolicy(game)
  for state, row in policy.state_lookup.items():
    probs = x if "player: 0" in state else y
    policy.action_probability_array[row] = np.pad(probs, (0, max(k, l) - len(probs)))
  return os_exploitability.nash_conv(game, policy)


@pytest.mark.parametrize("seed", range(4))
def test_nash_conv_matches_openspiel(seed):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(3, 4)) * 5
  b = -a if seed % 2 else rng.normal(size=(3, 4))          # zero-sum and general-sum
  x, y = rng.dirichlet(np.ones(3)), rng.dirichlet(np.ones(4))
  np.testing.assert_allclose(matrix.nash_conv(a, b, x, y), _openspiel_nash_conv(a, b, x, y),
                             atol=1e-9)
  got = matrix.nash_conv(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                         jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  np.testing.assert_allclose(float(got), _openspiel_nash_conv(a, b, x, y), rtol=1e-5, atol=1e-5)


def test_known_equilibria_have_zero_exploitability():
  for preset, nash in (("rps", np.ones(3) / 3), ("biased_rps", np.array([1, 10, 5]) / 16)):
    game = matrix.matrix_game(preset=preset)
    assert abs(matrix.nash_conv(game.agent_matrix, game.opponent_matrix, nash, nash)) < 1e-12
    assert _openspiel_nash_conv(game.agent_matrix, game.opponent_matrix, nash, nash) < 1e-12


@pytest.mark.parametrize("seed", range(3))
def test_scripted_nash_is_an_equilibrium_openspiel_agrees_with(seed):
  """The scripted 'nash' player of each seat is its maxmin strategy: the two together have zero
  NashConv by OpenSpiel's count, on biased RPS (the closed form (1, 10, 5) / 16) and on random
  zero-sum matrices."""
  game = matrix.matrix_game(preset="biased_rps")
  for seat in records.SEATS:
    np.testing.assert_allclose(game.scripted_policy("nash", seat), np.array([1, 10, 5]) / 16,
                               atol=1e-9)
  a = np.random.default_rng(seed).normal(size=(3 + seed, 4)).round(2)
  game = matrix.matrix_game(matrix=a.tolist())
  x, y = game.scripted_policy("nash", "agent"), game.scripted_policy("nash", "opponent")
  assert x.shape == (3 + seed,) and y.shape == (4,)
  assert _openspiel_nash_conv(a, -a, x, y) < 1e-7
  general = matrix.matrix_game(matrix=[[1, 0], [0, 1]], opponent_matrix=[[1, 0], [0, 2]])
  with pytest.raises(matrix.GameConfigError, match="'nash' needs a zero-sum game"):
    general.scripted_policy("nash", "agent")
  np.testing.assert_array_equal(general.scripted_policy("b", "opponent"), [0.0, 1.0])


# ---- the MMD payoff against a NumPy reference -----------------------------------------------------

V, BOS_, L1, L2 = 8, 1, 2, 3
ACTIONS = {"agent": [5, 6, 7], "opponent": [5, 6]}
LEGAL = np.ones((V, V), bool)
LEGAL[L1], LEGAL[L2] = False, False
LEGAL[L1, ACTIONS["agent"]] = True
LEGAL[L2, ACTIONS["opponent"]] = True
bigram = lambda params, tokens, positions, segment_ids: params[tokens]
APPLY = matrix.legal_moves(bigram, LEGAL)


def _data(seed=0, rows=6):
  rng = np.random.default_rng(seed)
  a = rng.integers(0, 3, rows)
  b = rng.integers(0, 2, rows)
  c, ag, op = records.CHANCE, records.AGENT, records.OPPONENT
  tokens = np.stack([[BOS_, L1, ACTIONS["agent"][i], BOS_, L2, ACTIONS["opponent"][j]]
                     for i, j in zip(a, b)]).astype(np.int32)
  row = lambda v: np.broadcast_to(np.asarray(v, np.int32), tokens.shape).copy()
  moves = records.GameRecord(tokens=tokens, positions=row([0, 1, 2, 0, 1, 2]),
                             segment_ids=row([1, 1, 1, 2, 2, 2]), players=row([c, c, ag, c, c, op]))
  values = {s: np.zeros((rows, V), np.float32) for s in records.SEATS}
  values["agent"][:, ACTIONS["agent"]] = rng.normal(size=(rows, 3))
  values["opponent"][:, ACTIONS["opponent"]] = rng.normal(size=(rows, 2))
  rewards = {s: rng.normal(size=rows).astype(np.float32) for s in records.SEATS}
  judgments = {}
  for s in records.SEATS:
    judgments[f"{s}/rewards"] = rewards[s]
    judgments[f"{s}/action_values"] = values[s]
  return dict(moves=moves, a=a, b=b, judgments=judgments,
              table=rng.normal(size=(V, V)).astype(np.float32),
              magnet=rng.normal(size=(V, V)).astype(np.float32))


def np_mmd(table, data, seat, alpha, estimator, magnet=None):
  """Sokota et al. (2023): per row, the seat's policy term minus alpha * KL(pi || rho) at its
  decision, pi and rho softmaxes over the legal moves; the mean over rows."""
  label = L1 if seat == "agent" else L2
  legal = ACTIONS[seat]
  def policy(t):
    z = t[label, legal].astype(np.float64)
    z = z - z.max()
    return np.exp(z) / np.exp(z).sum()
  pi = policy(table)
  rho = np.ones(len(legal)) / len(legal) if magnet is None else policy(magnet)
  kl = float(np.sum(pi * (np.log(pi) - np.log(rho))))
  r = data["judgments"][f"{seat}/rewards"].astype(np.float64)
  moved = data["a"] if seat == "agent" else data["b"]
  total = 0.0
  for i in range(len(r)):
    if estimator == "sampled":
      term = (r[i] - r.mean()) * np.log(pi[moved[i]])
    else:
      term = float(pi @ data["judgments"][f"{seat}/action_values"][i, legal].astype(np.float64))
    total += term - alpha * kl
  return total / len(r)


def _fd_grad(fn, table, h=1e-6):
  table = table.astype(np.float64)
  grad = np.zeros_like(table)
  for i, j in itertools.product(range(V), range(V)):
    up, down = table.copy(), table.copy()
    up[i, j] += h
    down[i, j] -= h
    grad[i, j] = (fn(up) - fn(down)) / (2 * h)
  return grad


CASES = [("agent", 0.3, "sampled", False), ("opponent", 0.3, "all_actions", True),
         ("agent", 0.0, "all_actions", False), ("opponent", 1.0, "sampled", True)]


@pytest.mark.parametrize("seat, alpha, estimator, with_magnet", CASES)
def test_mmd_value_and_gradient_match_numpy(seat, alpha, estimator, with_magnet):
  data = _data()
  frozen = {"magnet": jnp.asarray(data["magnet"])} if with_magnet else {}
  play = Play(APPLY, jax.tree.map(jnp.asarray, data["moves"]),
              {k: jnp.asarray(v) for k, v in data["judgments"].items()}, jax.random.PRNGKey(0),
              frozen)
  payoff = mmd(seat, alpha=alpha, magnet="magnet" if with_magnet else None, estimator=estimator)
  (value, metrics), grad = jax.jit(jax.value_and_grad(lambda t: payoff(t, play), has_aux=True))(
      jnp.asarray(data["table"]))
  magnet = data["magnet"].astype(np.float64) if with_magnet else None
  reference = lambda t: np_mmd(t, data, seat, alpha, estimator, magnet)
  np.testing.assert_allclose(float(value), reference(data["table"]), rtol=1e-5, atol=1e-6)
  expected = _fd_grad(reference, data["table"])
  assert np.abs(expected).max() > 1e-2
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-4, atol=2e-5)
  assert float(metrics["kl"]) >= 0


def test_both_seats_in_one_payoff_is_the_sum_of_each():
  data = _data(seed=3)
  play = Play(APPLY, jax.tree.map(jnp.asarray, data["moves"]),
              {k: jnp.asarray(v) for k, v in data["judgments"].items()}, jax.random.PRNGKey(0))
  table = jnp.asarray(data["table"])
  both, metrics = mmd(("agent", "opponent"), alpha=0.2)(table, play)
  parts = [mmd(s, alpha=0.2)(table, play)[0] for s in records.SEATS]
  np.testing.assert_allclose(float(both), float(sum(parts)), rtol=1e-6)
  assert {"agent/kl", "opponent/kl", "loss"} <= set(metrics)


def test_naive_sampled_mmd_is_reinforce_of_the_seat():
  """alpha = 0 with sampled moves is REINFORCE with the batch-mean baseline, of either seat."""
  data = _data(seed=5)
  play = Play(APPLY, jax.tree.map(jnp.asarray, data["moves"]),
              {k: jnp.asarray(v) for k, v in data["judgments"].items()}, jax.random.PRNGKey(0))
  table = jnp.asarray(data["table"])
  for seat in records.SEATS:
    g1 = jax.grad(lambda t: mmd(seat, alpha=0.0)(t, play)[0])(table)
    g2 = jax.grad(lambda t: reinforce(seat=seat)(t, play)[0])(table)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-5, atol=1e-7)


def test_mmd_errors():
  with pytest.raises(ValueError, match="alpha"):
    mmd(alpha=-1.0)
  with pytest.raises(ValueError, match="estimator"):
    mmd(estimator="exact")
  with pytest.raises(ValueError, match="unknown seat 'judge'"):
    mmd(seat="judge")
  data = _data()
  play = Play(APPLY, jax.tree.map(jnp.asarray, data["moves"]), {}, jax.random.PRNGKey(0))
  with pytest.raises(KeyError, match="opponent/rewards"):
    mmd("opponent")(jnp.asarray(data["table"]), play)
  with pytest.raises(KeyError, match="no frozen player 'magnet'"):
    mmd("agent", magnet="magnet")(jnp.asarray(data["table"]), play._replace(
        judgments={k: jnp.asarray(v) for k, v in data["judgments"].items()}))


# ---- the game in the compiled step ----------------------------------------------------------------

def _game_setup(mesh, two_learners=True, k_steps=5, games=64, feedback="sampled",
                updates="simultaneous"):
  game = matrix.matrix_game(preset="biased_rps", feedback=feedback)
  apply = game.mask(functools.partial(llama.apply, CFG), CFG.vocab_size)
  if two_learners:
    learners = {s: game_step.Learner(apply, mmd(s, alpha=0.3, magnet=f"magnet_{s}",
                                                 estimator="all_actions"), optax.adam(1e-2))
                for s in records.SEATS}
    seats = {s: s for s in records.SEATS}
    followers = {f"magnet_{s}": selfplay.ema(s, 0.9) for s in records.SEATS}
    params = {s: llama.init_params(CFG, jax.random.PRNGKey(i)) for i, s in enumerate(records.SEATS)}
  else:
    learners = {"player": game_step.Learner(apply, mmd(records.SEATS, alpha=0.0),
                                            optax.adam(1e-2))}
    seats = {s: "player" for s in records.SEATS}
    followers = {"past": selfplay.lagged("player", every=2)}
    params = {"player": llama.init_params(CFG, jax.random.PRNGKey(0))}
  keeper = selfplay.follow(followers)
  g = game_step.Game(learners=learners, play=game.play_fn(apply, seats, game_step.player_params),
                     respond=game.respond_fn(CFG.vocab_size), after=keeper.after,
                     updates=updates)
  state = game_step.init_state(g, params, jax.random.PRNGKey(7),
                               selfplay.init_followers(followers, params))
  traces = []
  fn, shardings = game_step.make_step(g, mesh, jax.eval_shape(lambda: state),
                                      on_trace=lambda: traces.append(1))
  batches = {"games": np.zeros((k_steps, games), np.int32)}
  return game, apply, fn, jax.device_put(state, shardings), batches, traces


def test_play_attributes_moves_and_judges_each_seat():
  game = matrix.matrix_game(preset="biased_rps")
  apply = game.mask(functools.partial(llama.apply, CFG), CFG.vocab_size)
  params = {"a": llama.init_params(CFG, jax.random.PRNGKey(0)),
            "b": llama.init_params(CFG, jax.random.PRNGKey(1))}
  state = game_step.GameState(params=params, opt_state={}, frozen={}, rng=None, step=None)
  play = game.play_fn(apply, {"agent": "a", "opponent": "b"}, game_step.player_params)
  moves, facts = jax.jit(play)(state, {"games": jnp.zeros((4000,), jnp.int32)},
                               jax.random.PRNGKey(3))
  judgments = game.respond_fn(CFG.vocab_size)(state, moves, facts, None)
  tokens = np.asarray(moves.tokens)
  assert (np.asarray(moves.players)[0] == [3, 3, 1, 3, 3, 2]).all()
  ids = {s: game.action_tokens(s) for s in records.SEATS}
  # Each seat's policy is the softmax over its action tokens of its own player's logits.
  for seat, who, col in (("agent", "a", 2), ("opponent", "b", 5)):
    prefix = jnp.asarray(game.prefix(seat))[None]
    logits = np.asarray(llama.apply(CFG, params[who], prefix, jnp.arange(2)[None],
                                    jnp.ones_like(prefix)))[0, -1, ids[seat]].astype(np.float64)
    want = np.exp(logits - logits.max())
    want /= want.sum()
    moved = np.argmax(tokens[:, col, None] == ids[seat][None], axis=1)
    assert set(np.unique(tokens[:, col])) <= set(ids[seat].tolist())
    freq = np.bincount(moved, minlength=3) / len(moved)
    np.testing.assert_allclose(freq, want, atol=0.03)                 # sampled from it
    np.testing.assert_allclose(np.asarray(facts["behaviour_logprobs"])[:, col - 1],
                               np.log(want)[moved], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(facts[f"{seat}/policy"])[0], want, rtol=1e-4)
  # The judge pays the matrix entries (over the scale), zero-sum, and the action values are each
  # action's payoff against the other's move.
  a_idx = np.argmax(tokens[:, 2, None] == ids["agent"][None], axis=1)
  b_idx = np.argmax(tokens[:, 5, None] == ids["opponent"][None], axis=1)
  paid = np.asarray(BIASED, np.float32)[a_idx, b_idx] / 50
  np.testing.assert_allclose(judgments["agent/rewards"], paid, rtol=1e-6)
  np.testing.assert_allclose(judgments["opponent/rewards"], -paid, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(judgments["agent/action_values"])[:, ids["agent"]],
                             np.asarray(BIASED, np.float32)[:, b_idx].T / 50, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(judgments["opponent/action_values"])[:, ids["opponent"]],
                             -np.asarray(BIASED, np.float32)[a_idx, :] / 50, rtol=1e-6)
  x, y = (np.asarray(facts[f"{s}/policy"])[0].astype(np.float64) for s in records.SEATS)
  # With expected feedback, the action values are against the other seat's mixed strategy.
  expected = dataclasses.replace(game, feedback="expected").respond_fn(CFG.vocab_size)(
      state, moves, facts, None)
  np.testing.assert_allclose(np.asarray(expected["agent/action_values"])[0, ids["agent"]],
                             np.asarray(BIASED) @ y / 50, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(expected["opponent/action_values"])[0, ids["opponent"]],
                             -x @ np.asarray(BIASED) / 50, rtol=1e-5)
  np.testing.assert_allclose(float(facts["metrics"]["exploitability"]),
                             _openspiel_nash_conv(np.asarray(BIASED, float),
                                                  -np.asarray(BIASED, float), x, y) / 2,
                             rtol=1e-4)
  evaluated = game.evaluate(apply, {"agent": params["a"], "opponent": params["b"]})
  np.testing.assert_allclose(evaluated["exploitability"],
                             float(facts["metrics"]["exploitability"]), rtol=1e-4)


def test_two_learners_update_in_one_step_that_traces_once():
  """Alternating updates: step 0 moves the agent only, step 1 the opponent only; over many
  steps both learners and their magnets move, and the step is traced once."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  _, _, fn, state, batches, traces = _game_setup(mesh, k_steps=1, updates="alternating")
  before = jax.device_get(state.params)
  magnets = jax.device_get(state.frozen)
  state, _ = fn(state, batches)
  mid = jax.device_get(state.params)
  assert not np.allclose(before["agent"]["embedding"], mid["agent"]["embedding"])
  np.testing.assert_array_equal(before["opponent"]["embedding"], mid["opponent"]["embedding"])
  state, _ = fn(state, batches)
  end = jax.device_get(state.params)
  np.testing.assert_array_equal(mid["agent"]["embedding"], end["agent"]["embedding"])
  assert not np.allclose(mid["opponent"]["embedding"], end["opponent"]["embedding"])
  for _ in range(4):
    state, metrics = fn(state, batches)
  assert len(traces) == 1 and int(state.step) == 6
  for s in records.SEATS:                     # their magnets followed
    assert not np.allclose(magnets[f"magnet_{s}"]["embedding"],
                           jax.device_get(state.frozen)[f"magnet_{s}"]["embedding"])
  assert {"agent/loss", "opponent/loss", "exploitability", "judge/agent_reward"} <= set(metrics)
  with pytest.raises(ValueError, match="updates='sometimes'"):
    game_step.Game(learners={}, updates="sometimes")


def test_lagged_follower_refreshes_every_n_steps_inside_the_step():
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  _, _, fn, state, batches, _ = _game_setup(mesh, two_learners=False, k_steps=3)
  state, _ = fn(state, batches)                       # steps 1, 2, 3: refreshed at 2
  past = jax.device_get(state.frozen["past"])
  now = jax.device_get(state.params["player"])
  assert not np.allclose(past["embedding"], now["embedding"])
  state2, _ = fn(state, batches)                      # steps 4, 5, 6: refreshed at 6
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state2.frozen["past"]),
               jax.device_get(state2.params["player"]))


def run_on(mesh):
  """One call of 3 two-learner steps on ``mesh`` (``eight_devices`` compares meshes)."""
  _, _, fn, state, batches, _ = _game_setup(mesh, k_steps=3, games=32)
  state, metrics = fn(state, batches)
  return np.asarray(metrics["loss"]), jax.device_get(state.params)


def test_two_learners_on_eight_devices_match_one_device():
  eight_devices.assert_eight_devices_match_one("test_matrix", meshes=eight_devices.DATA_AND_ALL_AXES)


# ---- bad games ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(matrix=[[1, 2], [3]]), r"not rectangular, rows have \[2, 1\]"),
    (dict(matrix=[[1, "x"], [3, 4]]), "row 0 holds 'x', not a number"),
    (dict(matrix=[]), "non-empty list of rows"),
    (dict(), "give matrix="),
    (dict(preset="chess"), "preset='chess'"),
    (dict(matrix=[[1, 2], [3, 4]], opponent_matrix=[[1, 2, 3]]), "opponent_matrix has shape"),
    (dict(matrix=[[1.0, float("inf")], [0, 0]]), "finite"),
    (dict(preset="rps", actions="RR"), "distinct"),
    (dict(preset="rps", feedback="oracle"), "feedback='oracle'"),
])
def test_bad_matrices_are_refused(kwargs, message):
  with pytest.raises(matrix.GameConfigError, match=message):
    matrix.matrix_game(**kwargs)


def test_follower_settings_are_checked():
  with pytest.raises(ValueError, match="snapshot interval"):
    selfplay.lagged("agent", every=0)
  with pytest.raises(ValueError, match="decay"):
    selfplay.ema("agent", decay=1.0)
  with pytest.raises(KeyError, match="follow learners that do not exist"):
    selfplay.init_followers({"past": selfplay.lagged("nobody", 2)}, {"agent": 0})


MMD_GIN = os.path.join(os.path.dirname(__file__), "..", "experiments", "matrix", "mmd.gin")


@pytest.mark.parametrize("binding, message", [
    ("matrix_game.matrix=[[1, 2], [3]]", "not rectangular"),
    ("matrix_game.matrix=[[1, 'a'], [3, 4]]", "row 0 holds 'a', not a number"),
    ("selfplay/Stage.seats={'agent': 'agent'}", "seat 'opponent' has no player"),
    ("selfplay/Stage.seats={'agent': 'agent', 'opponent': @lagged()}\nlagged.learner='agent'\n"
     "lagged.every=0", "snapshot interval must be an int >= 1"),
    ("selfplay/Stage.seats={'agent': 'agent', 'judge': 'agent'}", "seats has 'judge'"),
    ("selfplay/Stage.seats={'agent': 'agent', 'opponent': 'bob'}", "seats['opponent']='bob'"),
    ("ema.learner='bob'", "follower 'magnet' follows 'bob'"),
    ("selfplay/Stage.followers={}", "reads the frozen player 'magnet'"),
    ("selfplay/Stage.seats={'agent': 'agent', 'opponent': @mixture()}\nmixture.policy='agent'\n"
     "mixture.reference='ghost'\nmixture.beta=0.5", "mixes 'ghost', which is no player"),
    ("selfplay/Stage.seats={'agent': 'agent', 'opponent': @league()}\nleague.learner='agent'\n"
     "league.size=0\nleague.every=10", "league size must be an int >= 1"),
    ("selfplay/Stage.seats={'agent': 'agent', 'opponent': @scripted()}\n"
     "scripted.policy=[0.5, 0.6, 0]", "is not a probability distribution over 3 moves"),
    ("selfplay/Stage.seats={'agent': 'agent', 'opponent': @scripted()}\nscripted.policy='Q'",
     "seats['opponent']=scripted('Q'): expected 'uniform', 'nash'"),
])
def test_bad_game_configs_exit_2_and_create_nothing(tmp_path, capsys, binding, message):
  from gamejax import cli
  gin_file = tmp_path / "bad.gin"
  gin_file.write_text(f"include '{os.path.abspath(MMD_GIN)}'\n{binding}\n")
  work = tmp_path / "run"
  code = cli.main(["train", f"--gin_file={gin_file}", f"--workdir={work}", "--no_progress"])
  err = capsys.readouterr().err
  assert code == 2 and message in err, err
  assert not work.exists()


def test_matrix_experiment_runs_from_gin_evaluates_per_seat_plots_and_scores_its_league(
    tmp_path, capsys):
  """A short run of experiments/matrix/mmd.gin with a matrix given on the command line and a
  league of snapshots kept beside the magnet: exploitability logged every call and falling,
  summary.json and `gamejax eval --player` per seat, `gamejax plot` PNGs, `gamejax league` win
  rates and Elo of the league's members."""
  import json
  from gamejax import cli
  work = tmp_path / "run"
  custom = "[[0, 2, -1], [-2, 0, 3], [1, -3, 0]]"
  code = cli.main(["train", f"--gin_file={MMD_GIN}", f"--workdir={work}", "--no_progress",
                   "--gin.MATRIX_STEPS=300", f"--gin.matrix_game.matrix={custom}",
                   "--gin.selfplay/Stage.followers={'magnet': @ema(), 'past': @league()}",
                   "--gin.league.learner='agent'", "--gin.league.every=60",
                   "--gin.league.size=3"])
  assert code == 0, capsys.readouterr().err
  rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
  assert [r["step"] for r in rows] == list(range(50, 301, 50))
  assert rows[-1]["exploitability"] < rows[0]["exploitability"] / 2
  summary = json.load(open(work / "summary.json"))["selfplay"]
  assert set(summary["seats"]) == {"agent", "opponent"}
  assert set(summary["seats"]["agent"]["policy"]) == {"a", "b", "c"}
  a = np.asarray(json.loads(custom), float)
  x, y = (np.asarray(list(summary["seats"][s]["policy"].values())) for s in records.SEATS)
  np.testing.assert_allclose(summary["exploitability"], _openspiel_nash_conv(a, -a, x, y) / 2,
                             rtol=1e-6, atol=1e-9)
  capsys.readouterr()
  assert cli.main(["eval", f"--workdir={work}", "--player=agent"]) == 0
  out = json.loads(capsys.readouterr().out)["selfplay"]
  assert out["player"] == "agent" and abs(out["exploitability"] - summary["exploitability"]) < 1e-9
  assert cli.main(["eval", f"--workdir={work}", "--player=bob"]) == 2
  assert "not a learner" in capsys.readouterr().err
  assert cli.main(["plot", f"--workdir={work}"]) == 0
  written = capsys.readouterr().out.split()
  assert str(work / "plots" / "exploitability.png") in written
  assert all(os.path.getsize(p) > 1000 for p in written)
  assert cli.main(["league", f"--workdir={work}"]) == 0
  league_out = json.load(open(work / "league.json"))
  assert league_out["players"] == ["snapshot 3 (step 180)", "snapshot 4 (step 240)",
                                   "snapshot 5 (step 300)", "current"]
  scores = np.asarray(league_out["win_rates"])
  assert scores.shape == (4, 4) and ((0 <= scores) & (scores <= 1)).all()
  assert abs(np.mean(league_out["elo"]) - 1000) < 1e-6
  assert os.path.getsize(work / "plots" / "league.png") > 1000


def test_league_keeps_the_last_snapshots_in_a_ring():
  f = selfplay.league("agent", size=3, every=2)
  frozen = selfplay.init_followers({"l": f}, {"agent": jnp.array(0.0)})["l"]
  for step in range(1, 11):                          # snapshots at steps 2, 4, 6, 8, 10
    frozen = f.update(frozen, jnp.array(float(step)), jnp.array(step))
  assert int(frozen["count"]) == 6 and int(selfplay.league_members(frozen)) == 3
  np.testing.assert_array_equal(frozen["params"], [6.0, 8.0, 10.0])   # snapshot k in slot k % 3


def test_elo_recovers_bradley_terry_ratings():
  from gamejax import league
  true = np.array([1000.0, 1200.0, 850.0, 950.0])
  diff = (true[:, None] - true[None, :]) / league.ELO_SCALE
  scores = 1.0 / (1.0 + np.exp(-diff))
  got = league.elo(scores)
  np.testing.assert_allclose(got - got.mean(), true - true.mean(), atol=1e-3)


def test_a_league_seat_draws_one_member_per_game():
  """Against a league of two members, the opponent's moves follow the average of the members'
  policies, each game's behaviour log-prob is its own member's, and the logged exploitability
  is of that mixed strategy."""
  game = matrix.matrix_game(preset="biased_rps")
  apply = game.mask(functools.partial(llama.apply, CFG), CFG.vocab_size)
  members = [llama.init_params(CFG, jax.random.PRNGKey(i)) for i in (4, 5)]
  # Sharpen the members' policies differently: scale each one's embedding.
  members = [jax.tree.map(lambda x, c=c: x * c, m) for m, c in zip(members, (6.0, 1.0))]
  league = selfplay.init_followers({"l": selfplay.league("agent", size=3, every=1)},
                                   {"agent": members[0]})["l"]
  league = selfplay.Follower("agent", "league", every=1, size=3).update(
      league, members[1], jnp.array(1))                               # members: 0, 1
  state = game_step.GameState(params={"agent": members[0]}, opt_state={}, frozen={"l": league},
                              rng=None, step=None)
  play = game.play_fn(apply, {"agent": "agent", "opponent": "l"}, game_step.player_params)
  moves, facts = jax.jit(play)(state, {"games": jnp.zeros((6000,), jnp.int32)},
                               jax.random.PRNGKey(0))
  ids = game.action_tokens("opponent")
  policies = [np.exp(np.asarray(game.seat_logprobs(apply, m, "opponent"), np.float64))
              for m in members]
  assert np.abs(policies[0] - policies[1]).max() > 0.2
  mixture = (policies[0] + policies[1]) / 2
  moved = np.argmax(np.asarray(moves.tokens)[:, 5, None] == ids[None], axis=1)
  np.testing.assert_allclose(np.bincount(moved, minlength=3) / len(moved), mixture, atol=0.03)
  behaviour = np.exp(np.asarray(facts["behaviour_logprobs"])[:, 4])
  by_member = [p[moved] for p in policies]
  assert np.all(np.isclose(behaviour, by_member[0], rtol=1e-4)
                | np.isclose(behaviour, by_member[1], rtol=1e-4))
  assert 0.3 < np.mean(np.isclose(behaviour, by_member[0], rtol=1e-4)) < 0.7
  np.testing.assert_allclose(np.asarray(facts["opponent/policy"])[0], mixture, rtol=1e-4)


def test_a_mixture_seat_plays_the_geometric_mixture_of_two_players():
  """Nash-MD's opponent: the seat's policy is pi^(1 - beta) rho^beta, normalised (NumPy)."""
  game = matrix.matrix_game(preset="biased_rps")
  apply = game.mask(functools.partial(llama.apply, CFG), CFG.vocab_size)
  pi, rho = (jax.tree.map(lambda x, c=c: x * c, llama.init_params(CFG, jax.random.PRNGKey(i)))
             for i, c in ((8, 5.0), (9, 5.0)))
  state = game_step.GameState(params={"agent": pi}, opt_state={}, frozen={"reference": rho},
                              rng=None, step=None)
  seats = {"agent": "agent", "opponent": selfplay.mixture("agent", "reference", 0.3)}
  _, facts = jax.jit(game.play_fn(apply, seats, game_step.player_params))(
      state, {"games": jnp.zeros((8,), jnp.int32)}, jax.random.PRNGKey(0))
  p, r = (np.exp(np.asarray(game.seat_logprobs(apply, x, "opponent"), np.float64))
          for x in (pi, rho))
  want = p ** 0.7 * r ** 0.3
  want /= want.sum()
  assert np.abs(p - r).max() > 0.1
  np.testing.assert_allclose(np.asarray(facts["opponent/policy"])[0], want, rtol=1e-4)
  evaluated = game.evaluate(apply, {"agent": pi, "opponent": game_step.player_params(
      state, seats["opponent"])})
  np.testing.assert_allclose(list(evaluated["seats"]["opponent"]["policy"].values()), want,
                             rtol=1e-4)
  with pytest.raises(ValueError, match="beta must be in"):
    selfplay.mixture("agent", "reference", 1.5)


BEST_RESPONSE_GIN = os.path.join(os.path.dirname(MMD_GIN), "best_response.gin")


def test_a_learner_finds_the_best_response_to_a_scripted_seat(tmp_path, capsys):
  """experiments/matrix/best_response.gin, shortened: the scripted opponent plays exactly its
  mixed strategy (summary and `gamejax eval`, restored from the frozen players written once), and
  the learner's best-response gain falls towards 0 while its payoff nears the best response's."""
  import json
  from gamejax import cli
  work = tmp_path / "run"
  assert cli.main(["train", f"--gin_file={BEST_RESPONSE_GIN}", f"--workdir={work}",
                   "--no_progress", "--gin.MATRIX_STEPS=300"]) == 0, capsys.readouterr().err
  rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
  gains = [r["best_response_gain/agent"] for r in rows]
  assert gains[-1] < 0.05 * gains[0] and gains[-1] < 0.2, gains
  np.testing.assert_allclose([r["best_response_gain/opponent"] for r in rows][-1], 16.25,
                             atol=0.05)                      # the opponent's gain against P: 16.25
  summary = json.load(open(work / "summary.json"))["selfplay"]
  opponent = summary["seats"]["opponent"]["policy"]
  np.testing.assert_allclose([opponent[a] for a in "RPS"], [0.5, 0.25, 0.25], atol=1e-6)
  assert summary["seats"]["agent"]["value"] > 11.25 - 0.2
  assert os.path.isdir(work / "checkpoints" / "selfplay.frozen")
  capsys.readouterr()
  assert cli.main(["eval", f"--workdir={work}"]) == 0
  out = json.loads(capsys.readouterr().out)["selfplay"]
  np.testing.assert_allclose(out["exploitability"], summary["exploitability"], atol=1e-9)
