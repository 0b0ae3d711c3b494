"""The reward model (Llama trunk + scalar head) and the Bradley-Terry payoff, against NumPy."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gamejax import records
from gamejax.models import llama, reward
from gamejax.payoffs.base import Play
from gamejax.payoffs.preference import bradley_terry, bradley_terry_pair_loss

CFG = llama.LlamaConfig(vocab_size=24, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                        init_std=0.3)
V, T, P = 9, 10, 4
O, A = records.OPPONENT, records.AGENT


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
  with jax.numpy_rank_promotion("raise"):
    yield


def _random_head(params, seed=1):
  rng = np.random.default_rng(seed)
  head = {"w": jnp.asarray(rng.standard_normal(CFG.d_model), jnp.float32),
          "b": jnp.float32(0.25)}
  return {**params, "head": head}


def _tokens(b=3, t=7, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, CFG.vocab_size, (b, t)).astype(np.int32)
  segments = np.ones((b, t), np.int32)
  segments[1, 5:] = 0  # padding
  positions = np.where(segments > 0, np.arange(t, dtype=np.int32)[None], 0).astype(np.int32)
  return tokens, positions, segments


# ----------------------------------------------------------------------------------------------
# The model.

@pytest.mark.parametrize("tie", [True, False])
def test_hidden_is_the_trunk_of_apply(tie):
  cfg = llama.LlamaConfig(**{**CFG.__dict__, "tie_embeddings": tie})
  params = llama.init_params(cfg, jax.random.key(0))
  tokens, positions, segments = _tokens()
  h = jax.jit(llama.hidden, static_argnums=0)(cfg, params, tokens, positions, segments)
  logits = jax.jit(llama.apply, static_argnums=0)(cfg, params, tokens, positions, segments)
  assert h.shape == (3, 7, cfg.d_model) and h.dtype == jnp.float32
  head = np.asarray(params["embedding"]).T if tie else np.asarray(params["lm_head"])
  np.testing.assert_allclose(np.asarray(h, np.float64) @ head, logits, rtol=1e-4, atol=1e-5)


def test_reward_apply_is_head_on_hidden():
  params = reward.init_params(CFG, jax.random.key(0))
  assert "lm_head" not in params["trunk"]
  assert params["head"]["w"].shape == (CFG.d_model,) and params["head"]["b"].shape == ()
  tokens, positions, segments = _tokens()
  fn = jax.jit(reward.apply, static_argnums=0)
  np.testing.assert_array_equal(fn(CFG, params, tokens, positions, segments), np.zeros((3, 7)))
  params = _random_head(params)
  scores = fn(CFG, params, tokens, positions, segments)
  assert scores.shape == (3, 7) and scores.dtype == jnp.float32
  h = np.asarray(llama.hidden(CFG, params["trunk"], tokens, positions, segments), np.float64)
  want = h @ np.asarray(params["head"]["w"], np.float64) + 0.25
  np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)
  # A position's score depends only on its own segment's tokens up to it (causal trunk).
  changed = tokens.copy()
  changed[:, 4] = (changed[:, 4] % (CFG.vocab_size - 1)) + 1
  again = fn(CFG, params, changed, positions, segments)
  np.testing.assert_array_equal(again[:, :4], scores[:, :4])
  assert not np.allclose(again[:, 4], scores[:, 4])


def test_untied_reward_trunk_accepts_policy_params():
  cfg = llama.LlamaConfig(**{**CFG.__dict__, "tie_embeddings": False})
  policy = llama.init_params(cfg, jax.random.key(3))
  params = {"trunk": policy, "head": reward.init_params(cfg, jax.random.key(0))["head"]}
  tokens, positions, segments = _tokens()
  assert reward.apply(cfg, params, tokens, positions, segments).shape == (3, 7)


def test_sequence_scores_picks_last_agent_token():
  scores = jnp.asarray(np.arange(4 * 8, dtype=np.float32).reshape(4, 8) * 0.5 - 3.0)
  rec = records.GameRecord(
      # right padded; left padded with an agent tail of padding; no agent move; packed-free
      # but agent tokens in the middle followed by an opponent token.
      tokens=np.array([[1, 5, 6, 7, 2, 0, 0, 0],
                       [0, 0, 1, 5, 6, 2, 0, 0],
                       [1, 5, 6, 0, 0, 0, 0, 0],
                       [1, 5, 6, 7, 8, 9, 2, 3]], np.int32),
      positions=np.array([[0, 1, 2, 3, 4, 0, 0, 0],
                          [0, 0, 0, 1, 2, 3, 0, 0],
                          [0, 1, 2, 0, 0, 0, 0, 0],
                          [0, 1, 2, 3, 4, 5, 6, 7]], np.int32),
      segment_ids=np.array([[1, 1, 1, 1, 1, 0, 0, 0],
                            [0, 0, 1, 1, 1, 1, 0, 0],
                            [1, 1, 1, 0, 0, 0, 0, 0],
                            [1, 1, 1, 1, 1, 1, 1, 1]], np.int32),
      players=np.array([[O, O, A, A, A, 0, 0, 0],
                        [0, 0, O, O, A, A, 0, 0],
                        [O, O, O, 0, 0, 0, 0, 0],
                        [O, A, A, O, A, A, A, O]], np.int32))
  fn = jax.jit(reward.sequence_scores, static_argnums=2)
  got = fn(scores, jax.tree.map(jnp.asarray, rec), ("agent",))
  s = np.asarray(scores)
  want = [s[0, 4], s[1, 5], 0.0, s[3, 6]]  # hand-picked: each row's last agent token
  assert got.shape == (4,) and got.dtype == jnp.float32
  np.testing.assert_array_equal(got, want)
  got = fn(scores, jax.tree.map(jnp.asarray, rec), ("opponent",))
  np.testing.assert_array_equal(got, [s[0, 1], s[1, 3], s[2, 2], s[3, 7]])
  # Padding marked as a player (a malformed record) is never picked: segment 0 is excluded.
  bad = rec.replace(players=np.where(rec.segment_ids == 0, A, rec.players).astype(np.int32))
  np.testing.assert_array_equal(fn(scores, bad, ("agent",))[:2], want[:2])


def test_check_compatible():
  reward.check_compatible(CFG, llama.LlamaConfig(**{**CFG.__dict__, "d_model": 32}))
  other = llama.LlamaConfig(**{**CFG.__dict__, "vocab_size": 320})
  with pytest.raises(reward.RewardModelError, match=r"vocab_size=320.*policy's vocab_size=24"):
    reward.check_compatible(CFG, other)
  with pytest.raises(ValueError, match=r"vocab_size=24.*policy's vocab_size=320"):
    reward.check_compatible(other, CFG)


# ----------------------------------------------------------------------------------------------
# Bradley-Terry against a NumPy float64 reference, with a "linear score" model: the score at
# position t is the sum of a per-token table over the row's tokens <= t (padding included, so a
# wrong pick past the EOS would show).

def linear_scores(params, tokens, positions, segment_ids):
  del positions, segment_ids
  return jnp.cumsum(params["table"][tokens], axis=1)


def np_bt(table, record):
  """(loss, margins): -mean_i log sigmoid(s_c - s_r), s = sum of table over tokens <= the last
  agent token, in float64 with plain loops."""
  tokens, players, segments = map(np.asarray, (record.tokens, record.players, record.segment_ids))
  s = []
  for row in range(tokens.shape[0]):
    last = max(t for t in range(tokens.shape[1]) if players[row, t] == A and segments[row, t])
    s.append(sum(float(table[tokens[row, t]]) for t in range(last + 1)))
  s = np.array(s)
  p = len(s) // 2
  margins = s[:p] - s[p:]
  return np.mean(np.log1p(np.exp(-margins))), margins


@pytest.fixture
def batch():
  """P pairs: same prompt per pair, different answers ending in EOS, right padded."""
  rng = np.random.default_rng(2)
  chosen, rejected = [], []
  for _ in range(P):
    prompt = rng.integers(3, V, rng.integers(2, 4))
    for side in (chosen, rejected):
      answer = np.append(rng.integers(3, V, rng.integers(1, T - len(prompt))), 2)
      tok = np.concatenate([prompt, answer]).astype(np.int32)
      side.append((tok, np.array([O] * len(prompt) + [A] * len(answer), np.int32)))
  record = records.from_transcripts(chosen + rejected, T)
  assert (np.asarray(record.segment_ids) == 0).any()
  table = rng.normal(size=V).astype(np.float32)
  return record, table


def _play(apply, record):
  return Play(apply, jax.tree.map(jnp.asarray, record), {}, jax.random.key(0))


def test_bradley_terry_value_and_metrics_match_numpy(batch):
  record, table = batch
  payoff = bradley_terry()
  value, metrics = jax.jit(lambda p, r: payoff(p, _play(linear_scores, r)))(
      {"table": jnp.asarray(table)}, record)
  loss, margins = np_bt(table.astype(np.float64), record)
  assert 0 < (margins > 0).mean() < 1  # both outcomes present
  np.testing.assert_allclose(value, -loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["margin"], margins.mean(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], (margins > 0).mean(), atol=1e-7)
  np.testing.assert_allclose(metrics["chosen_score"] - metrics["rejected_score"], margins.mean(),
                             rtol=1e-5, atol=1e-5)


def test_bradley_terry_gradient_matches_finite_differences(batch):
  record, table = batch
  payoff = bradley_terry()
  grad = jax.jit(jax.grad(lambda p: payoff(p, _play(linear_scores, record))[0]))(
      {"table": jnp.asarray(table)})["table"]
  grad = np.asarray(grad)
  assert np.abs(grad).max() > 1e-3
  eps = 1e-4
  for v in range(V):
    up, down = table.astype(np.float64).copy(), table.astype(np.float64).copy()
    up[v] += eps
    down[v] -= eps
    fd = -(np_bt(up, record)[0] - np_bt(down, record)[0]) / (2 * eps)
    np.testing.assert_allclose(grad[v], fd, rtol=1e-4, atol=1e-6)
  # Padding (0, only past the picked EOS), unused (1) and EOS (2, once per side): no gradient.
  np.testing.assert_allclose(grad[:3], 0.0, atol=1e-7)


def test_pair_loss_hand_values():
  loss = jax.jit(bradley_terry_pair_loss)
  np.testing.assert_allclose(loss(jnp.float32(1.0), jnp.float32(0.0)), np.log1p(np.exp(-1.0)),
                             rtol=1e-6)
  np.testing.assert_allclose(loss(jnp.float32(0.0), jnp.float32(1.0)), np.log1p(np.exp(1.0)),
                             rtol=1e-6)
  np.testing.assert_allclose(loss(jnp.float32(0.0), jnp.float32(500.0)), 500.0, rtol=1e-6)
  assert loss(jnp.float32(500.0), jnp.float32(0.0)) == 0.0
  g = jax.grad(bradley_terry_pair_loss, argnums=(0, 1))(jnp.float32(0.0), jnp.float32(0.0))
  np.testing.assert_allclose(g, [-0.5, 0.5])


def test_bradley_terry_trains_the_reward_model_compiled_once(batch):
  record, _ = batch
  params = reward.init_params(CFG, jax.random.key(0))
  apply = lambda p, *a: reward.apply(CFG, p, *a)
  payoff = bradley_terry()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def sgd(p, moves):
    (value, metrics), g = jax.value_and_grad(lambda q: payoff(q, _play(apply, moves)),
                                             has_aux=True)(p)
    return jax.tree.map(lambda x, d: x + 0.5 * d, p, g), value, metrics

  params, value, metrics = sgd(params, record)
  np.testing.assert_allclose(value, -np.log(2.0), rtol=1e-6)  # zero head: every score is 0
  np.testing.assert_allclose(metrics["accuracy"], 0.0)
  for _ in range(30):
    params, value, metrics = sgd(params, record)
  assert value > -0.3 and metrics["accuracy"] == 1.0  # ascends the payoff: fits the 4 pairs


def test_bradley_terry_errors(batch):
  record, table = batch
  params = {"table": jnp.asarray(table)}
  odd = jax.tree.map(lambda x: x[:2 * P - 1], record)
  with pytest.raises(ValueError, match=r"bradley_terry: .*even.*\(7, 10\)"):
    bradley_terry()(params, _play(linear_scores, odd))
  logits = lambda p, tokens, *_: jnp.repeat(p["table"][tokens][..., None], 3, axis=-1)  # [B,T,V]
  with pytest.raises(AssertionError, match="rank"):
    bradley_terry()(params, _play(logits, record))
  with pytest.raises(ValueError, match="unknown player"):
    bradley_terry(players=("judge",))
