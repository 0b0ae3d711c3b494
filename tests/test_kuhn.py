"""Kuhn poker's exact exploitability against OpenSpiel's, on fixed, random and Nash policies."""
import numpy as np
import pyspiel
import pytest
from open_spiel.python import policy as os_policy
from open_spiel.python.algorithms import exploitability as os_exploitability
from open_spiel.python.games import data as os_data

from gamejax.games import kuhn

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
