"""DPO / IPO payoffs against NumPy per-token references written from the published formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigram_reference import bigram_apply, np_next_token_logliks, np_token_logliks
from gamejax import records
from gamejax.payoffs import (Play, dpo, dpo_pair_loss, imitation, ipo, ipo_pair_loss,
                             sequence_logprobs, weighted)

V, T, P = 9, 10, 3


def _np_sequence_logprobs(table, record, who):
  """Per row: the summed log-likelihood of `who`'s moves (NumPy reference)."""
  return np_token_logliks(table, record.tokens, record.players, record.segment_ids, who)[0]


def _np_preference(table, record, ref, beta, kind, average=False, who=(records.AGENT,)):
  """DPO (Rafailov et al. 2023, eq. 7) / IPO (Azar et al. 2023, eq. 17), mean over pairs; with
  ``average``, per-token average log-probs of policy and reference. ``ref``: the reference's
  per-row sums over ``who``'s tokens."""
  logp, counts = np_token_logliks(table, record.tokens, record.players, record.segment_ids, who)
  if average:
    logp, ref = logp / np.maximum(counts, 1), ref / np.maximum(counts, 1)
  p = len(logp) // 2
  losses, margins = [], []
  for i in range(p):
    h = (logp[i] - ref[i]) - (logp[p + i] - ref[p + i])  # log-ratio of chosen minus rejected
    if kind == "dpo":
      losses.append(np.log1p(np.exp(-beta * h)))  # -log sigmoid(beta h)
    else:
      losses.append((h - 1.0 / (2.0 * beta)) ** 2)
    margins.append(beta * h)
  return np.mean(losses), np.array(margins), logp


@pytest.fixture
def batch():
  """P pairs: same opponent prompt per pair, different agent answers of different lengths."""
  rng = np.random.default_rng(1)
  chosen, rejected = [], []
  for _ in range(P):
    prompt = rng.integers(1, V, rng.integers(2, 4))
    for side in (chosen, rejected):
      answer = rng.integers(1, V, rng.integers(1, T - len(prompt) + 1))
      tok = np.concatenate([prompt, answer]).astype(np.int32)
      ply = np.array([records.OPPONENT] * len(prompt) + [records.AGENT] * len(answer), np.int32)
      side.append((tok, ply))
  record = records.from_transcripts(chosen + rejected, T)
  assert (np.asarray(record.segment_ids) == 0).any()  # some padding
  table = rng.normal(size=(V, V)).astype(np.float32)
  ref_table = rng.normal(size=(V, V)).astype(np.float32)
  # The frozen reference's per-token log-probs of every moved token (the reference responder's
  # "reference_token_logprobs"); the payoffs sum the ones their players moved.
  ref = np_next_token_logliks(ref_table, record.tokens, record.players, record.segment_ids,
                              (records.AGENT, records.OPPONENT)).astype(np.float32)
  return record, table, ref


def _sums(record, ref, who=(records.AGENT,)):
  """Per row: the reference's summed log-probs of ``who``'s tokens (NumPy)."""
  return (ref.astype(np.float64) * _moved_by(record, who)).sum(axis=1)


def _moved_by(record, who):
  """``[B, T]``: token t+1 continues t's segment and was moved by ``who``."""
  seg, ply = np.asarray(record.segment_ids), np.asarray(record.players)
  out = np.zeros(seg.shape, bool)
  out[:, :-1] = (seg[:, :-1] > 0) & (seg[:, 1:] == seg[:, :-1]) & np.isin(ply[:, 1:], who)
  return out


def _play(record, ref):
  judgments = {} if ref is None else {"reference_token_logprobs": jnp.asarray(ref)}
  return Play(bigram_apply, jax.tree.map(jnp.asarray, record), judgments, jax.random.PRNGKey(0))


def _jitted(payoff):
  return jax.jit(lambda params, moves, ref: payoff(params, _play(moves, ref)))


FACTORIES = {"dpo": dpo, "ipo": ipo}


@pytest.mark.parametrize("kind", ["dpo", "ipo"])
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_value_and_metrics_match_numpy(batch, kind, beta):
  record, table, ref = batch
  value, metrics = _jitted(FACTORIES[kind](beta=beta))({"table": jnp.asarray(table)}, record, ref)
  loss, margins, logp = _np_preference(table, record, _sums(record, ref), beta, kind)
  np.testing.assert_allclose(value, -loss, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(metrics["reward_margin"], margins.mean(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], (margins > 0).mean(), atol=1e-7)
  sums = _sums(record, ref)
  np.testing.assert_allclose(metrics["chosen_logratio"], (logp[:P] - sums[:P]).mean(), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(metrics["rejected_logratio"], (logp[P:] - sums[P:]).mean(),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["dpo", "ipo"])
def test_gradient_matches_finite_differences(batch, kind):
  record, table, ref = batch
  beta = 0.3
  payoff = FACTORIES[kind](beta=beta)
  grad = jax.jit(jax.grad(lambda p, r: payoff(p, _play(record, r))[0]))(
      {"table": jnp.asarray(table)}, jnp.asarray(ref))["table"]
  grad = np.asarray(grad)
  assert np.abs(grad).max() > 1e-3
  big = np.unravel_index(np.argsort(-np.abs(grad), axis=None)[:3], grad.shape)
  coords = list(zip(*big)) + [(0, 0), (4, 2)]
  eps = 1e-3
  ref64 = _sums(record, ref)
  for (i, j) in coords:
    up, down = table.astype(np.float64).copy(), table.astype(np.float64).copy()
    up[i, j] += eps
    down[i, j] -= eps
    fd = -(_np_preference(up, record, ref64, beta, kind)[0]
           - _np_preference(down, record, ref64, beta, kind)[0]) / (2 * eps)
    np.testing.assert_allclose(grad[i, j], fd, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("who", [("agent",), ("opponent",), ("agent", "opponent")])
def test_sequence_logprobs_matches_hand_loop(batch, who):
  record, table, _ = batch
  # Also a packed row: two segments in one row sum together.
  packed = records.GameRecord(
      tokens=np.array([[3, 4, 5, 6, 7, 8, 1, 2, 0, 0]], np.int32),
      positions=np.array([[0, 1, 2, 3, 0, 1, 2, 3, 0, 0]], np.int32),
      segment_ids=np.array([[1, 1, 1, 1, 2, 2, 2, 2, 0, 0]], np.int32),
      players=np.array([[2, 2, 1, 1, 2, 1, 2, 1, 0, 0]], np.int32))
  ids = records.player_ids(who)
  fn = jax.jit(lambda t, m: sequence_logprobs(bigram_apply({"table": t}, m.tokens, m.positions,
                                                            m.segment_ids), m, who))
  for rec in (record, packed):
    got = fn(jnp.asarray(table), jax.tree.map(jnp.asarray, rec))
    assert got.shape == (rec.shape[0],) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, _np_sequence_logprobs(table, rec, ids), rtol=1e-5, atol=1e-5)


def test_hand_computed_scalars():
  # pi_c - ref_c = 1, pi_r - ref_r = 0.
  args = (jnp.float32(1.5), jnp.float32(-2.0), jnp.float32(0.5), jnp.float32(-2.0))
  dpo_loss = jax.jit(dpo_pair_loss, static_argnums=4)
  ipo_loss = jax.jit(ipo_pair_loss, static_argnums=4)
  np.testing.assert_allclose(dpo_loss(*args, 0.5), np.log1p(np.exp(-0.5)), rtol=1e-6)
  swapped = (args[1], args[0], args[3], args[2])
  np.testing.assert_allclose(dpo_loss(*swapped, 0.5), np.log1p(np.exp(0.5)), rtol=1e-6)
  np.testing.assert_allclose(ipo_loss(*args, 0.5), 0.0, atol=1e-7)  # (1 - 1/(2*0.5))**2
  np.testing.assert_allclose(ipo_loss(*args, 0.25), 1.0, rtol=1e-6)  # (1 - 2)**2
  np.testing.assert_allclose(ipo_loss(*swapped, 0.25), 9.0, rtol=1e-6)  # (-1 - 2)**2
  # Stable for large margins (no inf / nan).
  big = (jnp.float32(500.0), jnp.float32(0.0), jnp.float32(0.0), jnp.float32(0.0))
  assert np.isfinite(dpo_loss(*big, 1.0)) and np.isfinite(dpo_loss(big[1], big[0], 0., 0., 1.0))
  np.testing.assert_allclose(dpo_loss(big[1], big[0], jnp.float32(0.), jnp.float32(0.), 1.0), 500.0,
                             rtol=1e-6)


def test_reference_logprobs_get_no_gradient(batch):
  record, table, ref = batch
  params = {"table": jnp.asarray(table)}
  for payoff in (dpo(), ipo()):
    g = jax.jit(jax.grad(lambda r: payoff(params, _play(record, r))[0]))(jnp.asarray(ref))
    np.testing.assert_array_equal(g, np.zeros_like(ref))
  for loss in (dpo_pair_loss, ipo_pair_loss):
    g = jax.grad(loss, argnums=(0, 1, 2, 3))(1.0, 2.0, 0.5, -1.0, 0.3)
    assert g[2] == 0.0 and g[3] == 0.0 and g[0] != 0.0 and g[1] != 0.0


def test_errors(batch):
  record, table, ref = batch
  params = {"table": jnp.asarray(table)}
  odd = jax.tree.map(lambda x: x[:2 * P - 1], record)
  with pytest.raises(ValueError, match=r"even.*\(5, 10\)"):
    _jitted(dpo())(params, odd, ref[:2 * P - 1])
  with pytest.raises(KeyError, match="reference_token_logprobs"):
    _jitted(ipo())(params, record, None)
  for factory in (dpo, ipo):
    with pytest.raises(ValueError, match="beta"):
      factory(beta=0.0)
  with pytest.raises(ValueError, match="unknown player"):
    dpo(players=("judge",))


def test_weighted_composes_with_imitation(batch):
  record, table, ref = batch
  params = {"table": jnp.asarray(table)}
  combo = weighted({"dpo": (1.0, dpo()), "sft": (0.1, imitation(["agent"]))})
  value, metrics = _jitted(combo)(params, record, ref)
  play = _play(record, ref)
  expected = dpo()(params, play)[0] + 0.1 * imitation(["agent"])(params, play)[0]
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  assert {"dpo/loss", "dpo/accuracy", "dpo/reward_margin", "sft/loss", "loss"} <= set(metrics)
  grad = jax.jit(jax.grad(lambda p: combo(p, play)[0]))(params)
  assert np.isfinite(np.asarray(grad["table"])).all()


@pytest.mark.parametrize("kind", ["dpo", "ipo"])
def test_average_log_probs_option_matches_numpy(batch, kind):
  record, table, ref = batch
  payoff = FACTORIES[kind](beta=0.2, average_log_probs=True)
  value, _ = _jitted(payoff)({"table": jnp.asarray(table)}, record, ref)
  loss = _np_preference(table, record, _sums(record, ref), 0.2, kind, average=True)[0]
  np.testing.assert_allclose(value, -loss, rtol=1e-5, atol=1e-5)
  summed = _np_preference(table, record, _sums(record, ref), 0.2, kind)[0]
  assert abs(loss - summed) > 1e-3         # the option changes the objective
  grad = jax.jit(jax.grad(lambda p: payoff(p, _play(record, ref))[0]))(
      {"table": jnp.asarray(table)})["table"]
  eps, (i, j) = 1e-3, np.unravel_index(np.argmax(np.abs(grad)), grad.shape)
  up, down = table.astype(np.float64).copy(), table.astype(np.float64).copy()
  up[i, j] += eps
  down[i, j] -= eps
  ref64 = _sums(record, ref)
  fd = -(_np_preference(up, record, ref64, 0.2, kind, True)[0]
         - _np_preference(down, record, ref64, 0.2, kind, True)[0]) / (2 * eps)
  np.testing.assert_allclose(grad[i, j], fd, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kind", ["dpo", "ipo"])
@pytest.mark.parametrize("who", [("opponent",), ("agent", "opponent")])
def test_players_score_the_same_tokens_of_policy_and_reference(batch, kind, who):
  """With ``players=`` the policy's and the reference's sums run over the same players' tokens."""
  record, table, ref = batch
  ids = records.player_ids(who)
  value, _ = _jitted(FACTORIES[kind](beta=0.3, players=who))({"table": jnp.asarray(table)},
                                                              record, ref)
  loss = _np_preference(table, record, _sums(record, ref, ids), 0.3, kind, who=ids)[0]
  np.testing.assert_allclose(value, -loss, rtol=1e-5, atol=1e-5)
  if who == ("opponent",):   # (a pair's sides share their prompt: with both players the
    # opponent's part cancels in the margin) a reference summed over the agent alone disagrees
    agent_only = _np_preference(table, record, _sums(record, ref), 0.3, kind, who=ids)[0]
    assert abs(agent_only - loss) > 1e-3
