"""REINFORCE / RLOO / GRPO / KL payoffs against NumPy float64 per-token references written from the
published formulas; values compared directly, gradients against central finite differences of the
references, everything run under jax.jit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigram_reference import bigram_apply, np_log_softmax
from gamejax import records
from gamejax.payoffs import (Play, grpo, grpo_advantages, kl_estimate, kl_to_reference, reinforce,
                             rloo, rloo_advantages, weighted)

V, T = 7, 12          # vocabulary, row length
P, G = 2, 4           # prompts, completions per prompt
B = P * G
PROMPT_WIDTH = 4      # prompts are left-padded to this width; completions follow


# ---- the play ------------------------------------------------------------------------------------

def _record(rng):
  """Group-major rows: left-padded prompts (length 2 for group 0, 4 for group 1) followed by
  completions of different lengths, one of them empty, right-padded."""
  tokens, positions, segments, players = (np.zeros((B, T), np.int32) for _ in range(4))
  lengths = rng.integers(1, T - PROMPT_WIDTH + 1, B)
  lengths[5] = 0                                   # an empty completion
  lengths[2] = T - PROMPT_WIDTH                    # one that fills the row
  for g, prompt_len in enumerate((2, 4)):
    prompt = rng.integers(1, V, prompt_len)
    for i in range(G):
      row, start, n = g * G + i, PROMPT_WIDTH - prompt_len, lengths[g * G + i]
      end = PROMPT_WIDTH + n
      tokens[row, start:PROMPT_WIDTH] = prompt
      tokens[row, PROMPT_WIDTH:end] = rng.integers(1, V, n)
      players[row, start:PROMPT_WIDTH] = records.OPPONENT
      players[row, PROMPT_WIDTH:end] = records.AGENT
      segments[row, start:end] = 1
      positions[row, start:end] = np.arange(end - start)
  return records.GameRecord(tokens=tokens, positions=positions, segment_ids=segments,
                            players=players)


def np_agent_logprobs(table, record):
  """Per row: {t: log pi(x_{t+1} | x_t)} over t whose next token is the agent's, float64 loops."""
  tok, seg, ply = (np.asarray(x) for x in (record.tokens, record.segment_ids, record.players))
  out = []
  for b in range(tok.shape[0]):
    row = {}
    for t in range(tok.shape[1] - 1):
      if seg[b, t] == 0 or seg[b, t + 1] != seg[b, t] or ply[b, t + 1] != records.AGENT:
        continue
      row[t] = np_log_softmax(table[tok[b, t]])[tok[b, t + 1]]
    out.append(row)
  return out


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(7)
  record = _record(rng)
  table = rng.normal(size=(V, V)).astype(np.float32)
  ref_table = (table + 0.5 * rng.normal(size=(V, V))).astype(np.float32)
  # Group 0: spread-out rewards; group 1: rewards 1e-3 apart, so GRPO's eps (1e-4) matters.
  rewards = np.concatenate([rng.normal(size=G), 1e-3 * rng.normal(size=G)]).astype(np.float32)
  lp = np_agent_logprobs(table.astype(np.float64), record)
  ref_lp = np_agent_logprobs(ref_table.astype(np.float64), record)
  # Off the agent's tokens the judge's arrays hold junk: the payoffs must ignore it.
  behaviour = rng.normal(scale=10.0, size=(B, T))
  reference = rng.normal(scale=10.0, size=(B, T))
  on_policy = behaviour.copy()
  for b in range(B):
    for t in lp[b]:
      on_policy[b, t] = lp[b][t]
      behaviour[b, t] = lp[b][t] + rng.normal(scale=0.3)  # importance ratios outside 1 +- 0.2
      reference[b, t] = ref_lp[b][t]
  assert sum(len(r) == 0 for r in lp) == 1 and (np.asarray(record.segment_ids) == 0).any()
  return dict(record=record, table=table, rewards=rewards, behaviour=behaviour.astype(np.float32),
              on_policy=on_policy.astype(np.float32), reference=reference.astype(np.float32))


def _judgments(data, *, behaviour="behaviour", reference=True, rewards=None):
  j = {"agent/rewards": data["rewards"] if rewards is None else rewards}
  if behaviour:
    j["behaviour_logprobs"] = data[behaviour]
  if reference:
    j["reference_token_logprobs"] = data["reference"]
  return {k: jnp.asarray(v) for k, v in j.items()}


_COMPILED = {}


def _run(payoff, data, judgments, frozen=None):
  """(value, metrics, d value / d table) of the payoff under jax.jit (compiled once per payoff
  object and judgments structure: the tests share module-level payoffs to keep the suite fast).
  ``frozen``: the frozen players the payoff reads (constants of the compiled function)."""
  def value(table, moves, judgments):
    return payoff({"table": table}, Play(bigram_apply, moves, judgments, jax.random.PRNGKey(0),
                                         frozen or {}))
  if payoff not in _COMPILED:
    _COMPILED[payoff] = jax.jit(jax.value_and_grad(value, has_aux=True))
  fn = _COMPILED[payoff]
  (v, metrics), grad = fn(jnp.asarray(data["table"]), jax.tree.map(jnp.asarray, data["record"]),
                          judgments)
  return float(v), {k: float(m) for k, m in metrics.items()}, np.asarray(grad)


def _fd_grad(reference_value, table, h=1e-6):
  """Central finite differences of a float64 reference over every entry of the table."""
  table = table.astype(np.float64)
  grad = np.zeros_like(table)
  for i in range(V):
    for j in range(V):
      up, down = table.copy(), table.copy()
      up[i, j] += h
      down[i, j] -= h
      grad[i, j] = (reference_value(up) - reference_value(down)) / (2 * h)
  return grad


def _check(value, grad, reference_value, table):
  np.testing.assert_allclose(value, reference_value(table.astype(np.float64)), rtol=1e-5, atol=1e-6)
  expected = _fd_grad(reference_value, table)
  assert np.abs(expected).max() > 1e-2
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=2e-5)


# ---- NumPy references from the papers ------------------------------------------------------------

def np_reinforce(table, record, rewards, baseline):
  """Williams (1992): mean_i (r_i - b) * sum_t log pi(y_it), b = batch mean reward or 0."""
  lp = np_agent_logprobs(table, record)
  r = rewards.astype(np.float64)
  b = {"batch_mean": r.mean(), "none": 0.0, "role": 0.3}[baseline]
  return np.mean([(r[i] - b) * sum(lp[i].values()) for i in range(len(lp))])


def np_rloo(table, record, rewards, group_size, leave_one_out=True):
  """Ahmadian et al. (2024), eq. 4: A_i = r_i - 1/(k-1) sum_{j != i} r_j within the group."""
  lp = np_agent_logprobs(table, record)
  r = rewards.astype(np.float64)
  terms = []
  for g in range(len(lp) // group_size):
    rows = range(g * group_size, (g + 1) * group_size)
    for i in rows:
      others = [r[j] for j in rows if j != i] if leave_one_out else [r[j] for j in rows]
      terms.append((r[i] - sum(others) / len(others)) * sum(lp[i].values()))
  return np.mean(terms)


def np_grpo(table, record, rewards, behaviour, reference, group_size, clip_eps=0.2, beta=0.04,
            scale_rewards=True, loss_aggregation="sequence", max_completion_tokens=None, eps=1e-4,
            ddof=1, kl="k3", metrics=False):
  """Shao et al. (2024), eq. 3 and 4 (outcome supervision); Dr. GRPO (Liu et al. 2025) and DAPO
  (Yu et al. 2025) aggregation."""
  lp = np_agent_logprobs(table, record)
  r = rewards.astype(np.float64)
  seq_sums, seq_lens, advantages = [], [], []
  n_clipped = ratio_sum = kl_sum = 0.0
  for g in range(len(lp) // group_size):
    rows = list(range(g * group_size, (g + 1) * group_size))
    mean = sum(r[i] for i in rows) / group_size
    std = np.sqrt(sum((r[i] - mean) ** 2 for i in rows) / (group_size - ddof))
    for i in rows:
      a = (r[i] - mean) / (std + eps) if scale_rewards else r[i] - mean
      advantages.append(a)
      total = 0.0
      for t, logp in lp[i].items():
        rho = np.exp(logp - float(behaviour[i, t]))
        surrogate = min(rho * a, min(max(rho, 1 - clip_eps), 1 + clip_eps) * a)
        x = float(reference[i, t]) - logp                       # log pi_ref / pi
        d = {"k3": np.exp(x) - x - 1, "k1": -x, "k2": 0.5 * x * x}[kl]
        total += surrogate - beta * d
        n_clipped += (rho < 1 - clip_eps and a < 0) or (rho > 1 + clip_eps and a > 0)
        ratio_sum += rho
        kl_sum += d
      seq_sums.append(total)
      seq_lens.append(len(lp[i]))
  if loss_aggregation == "sequence":
    value = np.mean([s / max(n, 1) for s, n in zip(seq_sums, seq_lens)])
  elif loss_aggregation == "token":
    value = sum(seq_sums) / sum(seq_lens)
  else:
    value = np.mean([s / max_completion_tokens for s in seq_sums])
  if not metrics:
    return value
  n = sum(seq_lens)
  return value, {"reward_mean": r.mean(), "reward_std": r.std(),
                 "advantage_abs_mean": np.mean(np.abs(advantages)),
                 "completion_length": np.mean(seq_lens), "clip_fraction": n_clipped / n,
                 "ratio_mean": ratio_sum / n, "kl": kl_sum / n, "nonfinite_rewards": 0.0,
                 "loss": -value}


def np_kl(table, record, reference, estimator):
  """Schulman (2020) k1 / k2 / k3, mean over all the batch's agent tokens."""
  lp = np_agent_logprobs(table, record)
  values = []
  for i, row in enumerate(lp):
    for t, logp in row.items():
      x = float(reference[i, t]) - logp
      values.append({"k1": -x, "k2": 0.5 * x * x, "k3": np.exp(x) - x - 1}[estimator])
  return np.mean(values)


def _reward_metrics(rewards, advantages, record):
  lp = np_agent_logprobs(np.zeros((V, V)), record)
  return {"reward_mean": rewards.mean(), "reward_std": rewards.std(),
          "advantage_abs_mean": np.abs(advantages).mean(),
          "completion_length": np.mean([len(row) for row in lp]), "nonfinite_rewards": 0.0}


def _assert_metrics(got, expected):
  for k, v in expected.items():
    np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


# The payoffs under test, built once so that each compiles once.
REINFORCE = {"batch_mean": reinforce(), "none": reinforce("none"), "role": reinforce("role")}
RLOO = rloo(G)
GRPO_CASES = {
    "grpo": dict(),
    "dapo_token": dict(loss_aggregation="token", beta=0.1, clip_eps=0.1),
    "dr_grpo": dict(loss_aggregation="constant", max_completion_tokens=T - PROMPT_WIDTH,
                    scale_rewards=False, beta=0.0),
    "dr_grpo_kl": dict(loss_aggregation="constant", max_completion_tokens=10, scale_rewards=False,
                       clip_eps=0.3),
}
GRPO = {case: grpo(G, **kwargs) for case, kwargs in GRPO_CASES.items()}
GRPO_NO_KL = grpo(G, beta=0.0)
KL = {estimator: kl_to_reference(estimator) for estimator in ("k1", "k2", "k3")}


# ---- REINFORCE and RLOO --------------------------------------------------------------------------

@pytest.mark.parametrize("baseline", ["batch_mean", "none", "role"])
def test_reinforce_matches_numpy(data, baseline):
  """``role``: the seat's role baseline kept by the step (here 0.3 for the agent)."""
  frozen = {"roles": {"agent": jnp.asarray(0.3), "opponent": jnp.asarray(-0.3)}}
  value, metrics, grad = _run(REINFORCE[baseline], data, _judgments(data), frozen=frozen)
  rec, r = data["record"], data["rewards"].astype(np.float64)
  _check(value, grad, lambda t: np_reinforce(t, rec, r, baseline), data["table"])
  b = {"batch_mean": r.mean(), "none": 0.0, "role": 0.3}[baseline]
  _assert_metrics(metrics, {"loss": -value, **_reward_metrics(r, r - b, rec)})


def test_rloo_matches_numpy(data):
  value, metrics, grad = _run(RLOO, data, _judgments(data))
  rec, r = data["record"], data["rewards"].astype(np.float64)
  _check(value, grad, lambda t: np_rloo(t, rec, r, G), data["table"])
  a = np.concatenate([G / (G - 1) * (x - x.mean()) for x in r.reshape(P, G)])
  _assert_metrics(metrics, {"loss": -value, **_reward_metrics(r, a, rec)})


def test_rloo_advantages_are_the_scaled_centred_rewards(data):
  r = data["rewards"].reshape(P, G)
  got = jax.jit(jax.vmap(rloo_advantages))(jnp.asarray(r))
  np.testing.assert_allclose(got, G / (G - 1) * (r - r.mean(axis=1, keepdims=True)), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(rloo_advantages(jnp.array([1.0, 0.0, 0.0, 0.0])),
                             [1.0, -1 / 3, -1 / 3, -1 / 3], rtol=1e-6)
  # GRPO's advantage uses the sample std: [1, 0] -> mean 0.5, std sqrt(0.5).
  np.testing.assert_allclose(grpo_advantages(jnp.array([1.0, 0.0]), eps=0.0),
                             [0.5 / np.sqrt(0.5), -0.5 / np.sqrt(0.5)], rtol=1e-6)
  np.testing.assert_allclose(grpo_advantages(jnp.array([3.0, 1.0]), scale_rewards=False),
                             [1.0, -1.0])


# ---- GRPO ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(GRPO_CASES))
def test_grpo_matches_numpy(data, case):
  kwargs = GRPO_CASES[case]
  beta = kwargs.get("beta", 0.04)
  # With beta == 0 the reference key is not needed.
  judgments = _judgments(data, reference=beta > 0)
  value, metrics, grad = _run(GRPO[case], data, judgments)
  rec, r, beh, ref = data["record"], data["rewards"], data["behaviour"], data["reference"]
  _check(value, grad, lambda t: np_grpo(t, rec, r, beh, ref, G, **kwargs), data["table"])
  expected = np_grpo(data["table"].astype(np.float64), rec, r, beh, ref, G, metrics=True,
                     **kwargs)[1]
  if not beta:
    assert "kl" not in metrics
    del expected["kl"]
  _assert_metrics(metrics, expected)
  assert 0.1 < metrics["clip_fraction"] < 0.9  # clipping is active


def test_grpo_on_policy_has_ratio_one_and_no_clipping(data):
  judgments = _judgments(data, behaviour="on_policy", reference=False)
  value, metrics, grad = _run(GRPO_NO_KL, data, judgments)
  assert metrics["clip_fraction"] == 0.0
  np.testing.assert_allclose(metrics["ratio_mean"], 1.0, atol=1e-6)
  # Each completion's mean of rho * A is A (0 for the empty one): the value is mean_i A_i [n_i > 0].
  r = data["rewards"].astype(np.float64).reshape(P, G)
  a = ((r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(B)
  nonempty = np.array([len(row) > 0 for row in np_agent_logprobs(np.zeros((V, V)),
                                                                  data["record"])])
  np.testing.assert_allclose(value, (a * nonempty).mean(), rtol=1e-5, atol=1e-6)
  rec, beh = data["record"], data["on_policy"]
  r32, ref = data["rewards"], data["reference"]
  _check(value, grad, lambda t: np_grpo(t, rec, r32, beh, ref, G, beta=0.0), data["table"])


def test_references_are_sensitive_to_each_formula_detail(data):
  """Mutating one detail of a formula changes the value far beyond the tests' tolerance."""
  rec, r, beh, ref, table = (data["record"], data["rewards"], data["behaviour"], data["reference"],
                             data["table"])
  value = _run(GRPO["grpo"], data, _judgments(data))[0]
  t64 = table.astype(np.float64)
  mutants = [dict(ddof=0), dict(eps=0.0), dict(eps=1e-3), dict(beta=0.05), dict(clip_eps=0.22),
             dict(kl="k1"), dict(kl="k2"), dict(loss_aggregation="token"),
             dict(scale_rewards=False)]
  for mutant in mutants:
    mutated = np_grpo(t64, rec, r, beh, ref, G, **mutant)
    assert abs(mutated - value) > 20 * (1e-5 * abs(value) + 1e-6), mutant
  np.testing.assert_allclose(value, np_grpo(t64, rec, r, beh, ref, G), rtol=1e-5, atol=1e-6)
  value = _run(RLOO, data, _judgments(data))[0]
  assert abs(np_rloo(t64, rec, r, G, leave_one_out=False) - value) > 1e-2
  value = _run(REINFORCE["batch_mean"], data, _judgments(data))[0]
  assert abs(np_reinforce(t64, rec, r, "none") - value) > 1e-2


def test_nonfinite_reward_makes_the_value_nonfinite(data):
  """The step skips an update whose value or gradient is non-finite; the payoff must not hide one.

  Row 5 holds the empty completion: multiplying by its zero mask must not hide its reward.
  """
  payoffs = {"reinforce": REINFORCE["batch_mean"], "reinforce_none": REINFORCE["none"],
             "rloo": RLOO, **{case: GRPO[case] for case in ("grpo", "dapo_token", "dr_grpo_kl")}}
  for bad in (np.nan, np.inf, -np.inf):
    for row in (3, 5):
      rewards = data["rewards"].copy()
      rewards[row] = bad
      judgments = _judgments(data, rewards=rewards)
      for name, payoff in payoffs.items():
        value, metrics, grad = _run(payoff, data, judgments)
        assert not np.isfinite(value), (name, bad, row)
        if row != 5 or name != "reinforce_none":  # there the reward touches only its empty row
          assert not np.isfinite(grad).all(), (name, bad, row)
        assert metrics["nonfinite_rewards"] == 1.0, (name, bad, row)


# ---- KL to the reference -------------------------------------------------------------------------

@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_to_reference_matches_numpy(data, estimator):
  value, metrics, grad = _run(KL[estimator], data, _judgments(data))
  rec, ref = data["record"], data["reference"]
  _check(value, grad, lambda t: -np_kl(t, rec, ref, estimator), data["table"])
  n = sum(len(row) for row in np_agent_logprobs(np.zeros((V, V)), rec))
  _assert_metrics(metrics, {"kl": -value, "tokens": n})
  x = jnp.array([-3.0, -0.5, 0.0, 2.0])
  np.testing.assert_allclose(kl_estimate(jnp.zeros(4), x, estimator),
                             {"k1": -x, "k2": x * x / 2, "k3": np.exp(x) - x - 1}[estimator],
                             rtol=1e-6, atol=1e-7)


def test_kl_composes_with_rloo_in_weighted(data):
  judgments = _judgments(data)
  combo = weighted({"rloo": (1.0, rloo(8)), "kl": (0.05, kl_to_reference())})  # one group of 8
  value, metrics, grad = _run(combo, data, judgments)
  rec, r, ref = data["record"], data["rewards"], data["reference"]
  _check(value, grad, lambda t: np_rloo(t, rec, r, 8) - 0.05 * np_kl(t, rec, ref, "k3"),
         data["table"])
  assert {"rloo/payoff", "rloo/reward_mean", "kl/payoff", "kl/kl", "loss"} <= set(metrics)
  np.testing.assert_allclose(metrics["kl/kl"], np_kl(data["table"].astype(np.float64), rec, ref,
                                                     "k3"), rtol=1e-5)


def test_judgments_get_no_gradient(data):
  params = {"table": jnp.asarray(data["table"])}
  moves = jax.tree.map(jnp.asarray, data["record"])
  judgments = _judgments(data)
  for payoff in (REINFORCE["none"], RLOO, GRPO["grpo"], KL["k3"]):
    g = jax.jit(jax.grad(lambda j: payoff(params, Play(bigram_apply, moves, j,
                                                       jax.random.PRNGKey(0)))[0]))(judgments)
    for k, v in g.items():
      np.testing.assert_array_equal(v, np.zeros_like(v), err_msg=k)


# ---- errors --------------------------------------------------------------------------------------

def test_errors(data):
  for bad in (1, 0, 2.5, True):
    for factory in (rloo, grpo):
      with pytest.raises(ValueError, match="group_size"):
        factory(bad)
  with pytest.raises(ValueError, match="baseline"):
    reinforce("group_mean")
  with pytest.raises(ValueError, match="loss_aggregation"):
    grpo(G, loss_aggregation="batch")
  with pytest.raises(ValueError, match="max_completion_tokens"):
    grpo(G, loss_aggregation="constant")
  with pytest.raises(ValueError, match="clip_eps"):
    grpo(G, clip_eps=0.0)
  with pytest.raises(ValueError, match="beta"):
    grpo(G, beta=-0.1)
  with pytest.raises(ValueError, match="estimator"):
    kl_to_reference("k4")
  with pytest.raises(ValueError, match="estimator"):
    kl_estimate(jnp.zeros(2), jnp.zeros(2), "k4")
  full = _judgments(data)
  for payoff in (rloo(3), grpo(3)):
    with pytest.raises(ValueError, match=r"8 rows.*group_size=3"):
      _run(payoff, data, full)
  cases = [(reinforce(), "agent/rewards"), (rloo(G), "agent/rewards"), (grpo(G), "agent/rewards"),
           (grpo(G), "behaviour_logprobs"), (grpo(G), "reference_token_logprobs"),
           (kl_to_reference(), "reference_token_logprobs")]
  for payoff, key in cases:
    with pytest.raises(KeyError, match=key):
      _run(payoff, data, {k: v for k, v in full.items() if k != key})


def test_weighted_keeps_the_group_size_the_run_checks():
  from gamejax.payoffs import weighted
  mix = weighted({"rloo": (1.0, rloo(4)), "kl": (0.1, kl_to_reference())})
  assert mix.group_size == 4
  assert not hasattr(weighted({"kl": (0.1, kl_to_reference())}), "group_size")
  with pytest.raises(ValueError, match="group sizes \\[2, 4\\]"):
    weighted({"a": (1.0, rloo(4)), "b": (1.0, grpo(2))})
