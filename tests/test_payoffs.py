"""Imitation and the combinators against a hand-written NumPy per-token reference."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigram_reference import bigram_apply, np_token_logliks
from gamejax import records
from gamejax.models.llama import LlamaConfig
from gamejax.payoffs import Play, imitation, scaled, weighted


def _reference_loglik(table, tokens, players, segments, who):
  """Mean per-token log-likelihood of `who`'s moves, and their count (NumPy reference)."""
  sums, counts = np_token_logliks(table, tokens, players, segments, who)
  return sums.sum() / max(counts.sum(), 1), int(counts.sum())


def _jitted(payoff):
  """The payoff as the step calls it: under jit, with the model's apply closed over."""
  return jax.jit(lambda p, moves: payoff(p, Play(bigram_apply, moves, {}, jax.random.PRNGKey(0))))


@pytest.fixture
def packed():
  rng = np.random.default_rng(0)
  V = 11
  tokens = rng.integers(3, V, (3, 12)).astype(np.int32)
  segments = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12, [1] * 3 + [2] * 3 + [3] * 6], np.int32)
  players = rng.integers(1, 3, (3, 12)).astype(np.int32) * (segments > 0)
  positions = np.zeros_like(tokens)
  for b in range(3):
    for t in range(12):
      positions[b, t] = 0 if t == 0 or segments[b, t] != segments[b, t - 1] else positions[b, t - 1] + 1
  record = records.GameRecord(tokens=tokens, positions=positions, segment_ids=segments, players=players)
  table = rng.normal(size=(V, V)).astype(np.float32)
  return record, table


@pytest.mark.parametrize("who", [("agent",), ("opponent",), ("agent", "opponent")])
def test_imitation_matches_numpy_reference(packed, who):
  record, table = packed
  payoff = imitation(who)
  value, metrics = _jitted(payoff)({"table": jnp.asarray(table)}, record)
  ids = records.player_ids(who)
  expected, n = _reference_loglik(table, np.asarray(record.tokens), np.asarray(record.players),
                                  np.asarray(record.segment_ids), ids)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], -expected, rtol=1e-5)
  assert int(metrics["tokens"]) == n


def test_imitation_of_the_chosen_rows_reads_only_the_first_half(packed):
  """rows='chosen': the NLL of a preference batch's chosen transcripts (rows [0, B/2))."""
  record, table = packed
  record = jax.tree.map(lambda x: np.concatenate([x, x[:1]]), record)     # 4 rows: 2 chosen
  value, metrics = _jitted(imitation(("agent",), rows="chosen"))({"table": jnp.asarray(table)},
                                                                  record)
  ids = records.player_ids(("agent",))
  expected, n = _reference_loglik(table, np.asarray(record.tokens)[:2],
                                  np.asarray(record.players)[:2],
                                  np.asarray(record.segment_ids)[:2], ids)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  assert int(metrics["tokens"]) == n
  with pytest.raises(ValueError, match="rows='bad'"):
    imitation(rows="bad")


def test_imitation_gradient_matches_finite_differences(packed):
  record, table = packed
  payoff = imitation(("agent",))
  play = Play(bigram_apply, jax.tree.map(jnp.asarray, record), {}, jax.random.PRNGKey(0))
  grad = jax.jit(jax.grad(lambda p: payoff(p, play)[0]))({"table": jnp.asarray(table)})["table"]
  ids = records.player_ids(("agent",))
  eps = 1e-3
  args = (np.asarray(record.tokens), np.asarray(record.players), np.asarray(record.segment_ids), ids)
  for (i, j) in [(3, 4), (5, 7), (10, 3)]:
    up, down = table.astype(np.float64).copy(), table.astype(np.float64).copy()
    up[i, j] += eps
    down[i, j] -= eps
    fd = (_reference_loglik(up, *args)[0] - _reference_loglik(down, *args)[0]) / (2 * eps)
    np.testing.assert_allclose(grad[i, j], fd, atol=1e-4)


def test_weighted_sums_parts_and_names_metrics(packed):
  record, table = packed
  play = Play(bigram_apply, jax.tree.map(jnp.asarray, record), {}, jax.random.PRNGKey(0))
  params = {"table": jnp.asarray(table)}
  a, b = imitation(("agent",)), imitation(("opponent",))
  combo = weighted({"sft": (1.0, a), "lm": (0.25, b)})
  value, metrics = _jitted(combo)(params, record)
  va, vb = a(params, play)[0], b(params, play)[0]
  np.testing.assert_allclose(value, va + 0.25 * vb, rtol=1e-6)
  assert {"sft/loss", "lm/loss", "sft/payoff", "lm/tokens", "loss"} <= set(metrics)
  np.testing.assert_allclose(scaled(2.0, a)(params, play)[0], 2 * va, rtol=1e-6)
  with pytest.raises(ValueError):
    weighted({})


COMBINATIONS = {
    "bare": lambda p: p,
    "weighted": lambda p: weighted({"rloo": (1.0, p)}),
    "scaled": lambda p: scaled(0.5, p),
    "weighted_of_scaled": lambda p: weighted({"rl": (1.0, scaled(2.0, p)),
                                              "sft": (0.1, imitation(["agent"]))}),
    "scaled_of_weighted": lambda p: scaled(0.5, weighted({"rloo": (1.0, p)})),
    "weighted_of_weighted": lambda p: weighted({"outer": (1.0, weighted({"inner": (1.0, p)}))}),
}


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_counted_events_and_group_size_survive_every_combinator(name):
  """A non-finite reward is counted (``run.count_events``) and the group size is carried,
  however the payoff nests; so the run's group and minibatch checks still apply."""
  from gamejax import run
  from gamejax.payoffs import rloo
  payoff = COMBINATIONS[name](rloo(2))
  assert payoff.group_size == 2
  O, A = records.OPPONENT, records.AGENT
  moves = records.from_transcripts(
      [(np.array([3, 4, 5, 6]), np.array([O, O, A, A]))] * 4, seq_len=5)
  rewards = jnp.array([1.0, jnp.nan, 0.0, 1.0])
  play = Play(bigram_apply, jax.tree.map(jnp.asarray, moves), {"agent/rewards": rewards},
              jax.random.PRNGKey(0))
  _, metrics = jax.jit(lambda p: payoff(p, play))({"table": jnp.zeros((8, 8))})
  step_metrics = {f"agent/{k}": jnp.stack([v, v]) for k, v in metrics.items()}   # K = 2 steps
  step_metrics["agent/skipped_nonfinite"] = jnp.array([1.0, 1.0])
  step_metrics["play/no_stop"] = jnp.array([3.0, 0.0])
  assert run.count_events(step_metrics) == {"nonfinite_rewards": 2, "skipped_nonfinite": 2,
                                            "no_stop_completions": 3}


def test_a_mismatched_group_is_refused_under_scaled():
  from gamejax import config, run
  from gamejax.payoffs import rloo
  stage = run.Stage(name="rl", data=config.arena(), payoff=scaled(0.5, rloo(4)), steps=10,
                    rollout=run.Rollout(group_size=8))
  exp = run.Experiment(stages=[stage], model=LlamaConfig())
  with pytest.raises(run.ExperimentError, match="groups 4 completions per prompt"):
    exp.validate()
  with pytest.raises(run.ExperimentError, match="would split the groups of 4"):
    run.Experiment(stages=[dataclasses.replace(stage, rollout=run.Rollout(group_size=4),
                                               minibatches=2)], model=exp.model).validate()
