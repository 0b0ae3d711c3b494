"""PPO (GAE, per-token rewards, the prepare stage, the clipped actor-critic payoff) against NumPy
float64 references written from the published formulas with plain loops; values compared directly,
gradients against central finite differences of the references, everything run under jax.jit."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigram_reference import np_log_softmax
from gamejax import records
from gamejax.payoffs import Play, gae, ppo, ppo_advantages, ppo_prepare, token_rewards

V, T, B = 7, 12, 6    # vocabulary, row length, rows
PROMPT_WIDTH = 4
O, A = records.OPPONENT, records.AGENT


# ---- the play and an actor-critic test model -----------------------------------------------------

def ac_apply(params, tokens, positions, segment_ids):
  """Bigram logits from ``params["table"]``; the value, one per token, from ``params["values"]``."""
  del positions, segment_ids
  return params["table"][tokens], params["values"][tokens]


def _record(rng):
  """Left-padded prompts, then completions (one empty, one filling the row), right padding; row 5
  is a two-turn transcript, so its agent-token mask has a gap."""
  tokens, positions, segments, players = (np.zeros((B, T), np.int32) for _ in range(4))
  prompt_lens, completion_lens = (2, 3, 4, 1, 4, 2), (5, 8, 3, 1, 0, 0)
  for row, (p, n) in enumerate(zip(prompt_lens, completion_lens)):
    start, end = PROMPT_WIDTH - p, PROMPT_WIDTH + n
    tokens[row, start:end] = rng.integers(1, V, end - start)
    players[row, start:PROMPT_WIDTH], players[row, PROMPT_WIDTH:end] = O, A
    segments[row, start:end] = 1
    positions[row, start:end] = np.arange(end - start)
  turns = [O, O, A, A, A, O, O, A, A, A]            # row 5: prompt, reply, prompt, reply
  tokens[5, 2:] = rng.integers(1, V, len(turns))
  players[5, 2:], segments[5, 2:], positions[5, 2:] = turns, 1, np.arange(len(turns))
  return records.GameRecord(tokens=tokens, positions=positions, segment_ids=segments,
                            players=players)


def np_agent_positions(record):
  """Per row, the t whose next token t+1 is the agent's move in the same segment (plain loops)."""
  tok, seg, ply = (np.asarray(x) for x in (record.tokens, record.segment_ids, record.players))
  return [[t for t in range(T - 1)
           if seg[b, t] > 0 and seg[b, t + 1] == seg[b, t] and ply[b, t + 1] == A]
          for b in range(tok.shape[0])]


def np_logprobs(table, record):
  """[B, T] float64: log softmax(table[x_t])[x_{t+1}] at every position (read only on the mask)."""
  tok = np.asarray(record.tokens)
  out = np.zeros((B, T))
  for b in range(B):
    for t in range(T - 1):
      out[b, t] = np_log_softmax(table[tok[b, t]])[tok[b, t + 1]]
  return out


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(3)
  record = _record(rng)
  positions = np_agent_positions(record)
  assert [len(p) for p in positions] == [5, 8, 3, 1, 0, 6]
  assert positions[5] == [3, 4, 5, 8, 9, 10]        # a gap at 6, 7 (the second prompt)
  table = rng.normal(size=(V, V)).astype(np.float32)
  values = rng.normal(size=V).astype(np.float32)
  # The rollout's params: ratios and values move well outside the clip ranges.
  old_table = (table + 0.4 * rng.normal(size=(V, V))).astype(np.float32)
  old_values = (values + 0.6 * rng.normal(size=V)).astype(np.float32)
  ref_table = (table + 0.5 * rng.normal(size=(V, V))).astype(np.float32)
  rewards = rng.normal(size=B).astype(np.float32)
  on = np.zeros((B, T), bool)
  for b, ts in enumerate(positions):
    on[b, ts] = True
  # Off the agent's tokens the judge's arrays hold junk: the code must ignore it.
  junk = lambda: rng.normal(scale=10.0, size=(B, T))
  behaviour = np.where(on, np_logprobs(old_table.astype(np.float64), record), junk())
  reference = np.where(on, np_logprobs(ref_table.astype(np.float64), record), junk())
  on_policy = np.where(on, np_logprobs(table.astype(np.float64), record), junk())
  d = dict(record=record, positions=positions, on=on, table=table, values=values,
           old_table=old_table, old_values=old_values, rewards=rewards,
           behaviour=behaviour.astype(np.float32), reference=reference.astype(np.float32),
           on_policy=on_policy.astype(np.float32))
  # The PPO payoff's prepared inputs, from the NumPy prepare stage at the rollout's critic.
  prepared = np_prepare(d, old_values.astype(np.float64), gamma=0.95, lam=0.9, kl_coef=0.1,
                        whiten=True)
  d["prepared"] = {k: np.where(on, v, junk()).astype(np.float32) for k, v in prepared.items()}
  return d


def _params(table, values):
  return {"table": jnp.asarray(table), "values": jnp.asarray(values)}


def _play(data, judgments):
  return Play(ac_apply, jax.tree.map(jnp.asarray, data["record"]),
              {k: jnp.asarray(v) for k, v in judgments.items()}, jax.random.PRNGKey(0))


# ---- NumPy references ----------------------------------------------------------------------------

def np_gae(rewards, values, mask, gamma, lam, skip_gaps=True):
  """Schulman et al. (2016), eq. 16 with V(terminal) = 0, over the masked steps in reverse order.
  ``skip_gaps=False`` is a wrong variant that runs over every index from the first masked one."""
  steps = [t for t in range(len(mask)) if mask[t] > 0]
  if not skip_gaps and steps:
    steps = list(range(steps[0], steps[-1] + 1))
  adv, ret = np.zeros(len(mask)), np.zeros(len(mask))
  next_value = next_adv = 0.0
  for t in reversed(steps):
    delta = float(rewards[t]) + gamma * next_value - float(values[t])
    next_adv = delta + gamma * lam * next_adv
    next_value = float(values[t])
    adv[t], ret[t] = next_adv, next_adv + float(values[t])
  return adv * (mask > 0), ret * (mask > 0)


def np_token_rewards(rewards, mask, kl, kl_coef):
  """Ziegler et al. (2019), Ouyang et al. (2022): r on the last response token, -beta KL on each."""
  out = np.zeros(mask.shape)
  for b in range(mask.shape[0]):
    steps = [t for t in range(mask.shape[1]) if mask[b, t] > 0]
    for t in steps:
      out[b, t] = -kl_coef * float(kl[b, t])
    if steps:
      out[b, steps[-1]] += float(rewards[b])
  return out


def np_prepare(data, value_table, gamma, lam, kl_coef, whiten, var_ddof=0, behaviour="behaviour"):
  tok, on = np.asarray(data["record"].tokens), data["on"]
  values = np.where(on, value_table[tok], 0.0)
  kl = data[behaviour].astype(np.float64) - data["reference"].astype(np.float64)
  rewards = np_token_rewards(data["rewards"], on, kl, kl_coef)
  adv, ret = np.zeros((B, T)), np.zeros((B, T))
  for b in range(B):
    adv[b], ret[b] = np_gae(rewards[b], values[b], on[b], gamma, lam)
  if whiten:
    flat = [adv[b, t] for b in range(B) for t in range(T) if on[b, t]]
    mean = sum(flat) / len(flat)
    var = sum((a - mean) ** 2 for a in flat) / (len(flat) - var_ddof)
    adv = np.where(on, (adv - mean) / np.sqrt(var + 1e-8), 0.0)
  return {"agent/advantages": adv, "agent/returns": ret, "agent/old_values": values}


def np_ppo(table, value_table, data, judgments, clip_eps=0.2, value_clip_eps=0.2, value_coef=0.5,
           entropy_coef=0.0, value_max=True, metrics=False):
  """Schulman et al. (2017), eq. 7 and 9; the clipped value loss of OpenAI baselines' ppo2."""
  tok = np.asarray(data["record"].tokens)
  beh, adv, ret, old = (judgments[k].astype(np.float64) for k in
                        ("behaviour_logprobs", "agent/advantages", "agent/returns", "agent/old_values"))
  terms, stats = [], {k: [] for k in ("surr", "vloss", "clip", "vclip", "kl", "ent", "ratio", "A",
                                      "R", "V")}
  for b, steps in enumerate(data["positions"]):
    for t in steps:
      logits = np_log_softmax(table[tok[b, t]])
      rho = np.exp(logits[tok[b, t + 1]] - beh[b, t])
      a = adv[b, t]
      surr = min(rho * a, min(max(rho, 1 - clip_eps), 1 + clip_eps) * a)
      v, r = value_table[tok[b, t]], ret[b, t]
      err = (v - r) ** 2
      if value_clip_eps is None:
        v_clipped, clipped_err = v, err
      else:
        v_clipped = min(max(v, old[b, t] - value_clip_eps), old[b, t] + value_clip_eps)
        clipped_err = (v_clipped - r) ** 2
      vloss = 0.5 * (max(err, clipped_err) if value_max else min(err, clipped_err))
      ent = -sum(np.exp(l) * l for l in logits)
      terms.append(surr - value_coef * vloss + entropy_coef * ent)
      for k, x in dict(surr=surr, vloss=vloss, ent=ent, ratio=rho, A=a, R=r, V=v,
                       clip=(rho > 1 + clip_eps and a > 0) or (rho < 1 - clip_eps and a < 0),
                       vclip=clipped_err > err, kl=rho - 1 - np.log(rho)).items():
        stats[k].append(float(x))
  value = np.mean(terms)
  if not metrics:
    return value
  m = {k: np.mean(x) for k, x in stats.items()}
  returns, vals = np.array(stats["R"]), np.array(stats["V"])
  return value, {"loss": -value, "policy_loss": -m["surr"], "value_loss": m["vloss"],
                 "entropy": m["ent"], "clip_fraction": m["clip"], "value_clip_fraction": m["vclip"],
                 "approx_kl": m["kl"], "ratio_mean": m["ratio"], "advantage_mean": m["A"],
                 "return_mean": m["R"], "value_mean": m["V"], "tokens": len(terms),
                 "explained_variance": 1 - np.var(returns - vals) / np.var(returns)}


def _assert_metrics(got, expected):
  for k, v in expected.items():
    np.testing.assert_allclose(float(got[k]), v, rtol=1e-5, atol=2e-6, err_msg=k)


def _differs(mutated, value, what):
  assert np.abs(np.asarray(mutated) - np.asarray(value)).max() > 1e-3, what


# ---- GAE -----------------------------------------------------------------------------------------

GAE = jax.jit(jax.vmap(gae, in_axes=(0, 0, 0, None, None)))


def test_gae_matches_the_reverse_loop_over_agent_steps():
  rng = np.random.default_rng(0)
  n, t = 5, 16
  mask = (rng.random((n, t)) < 0.6).astype(np.float32)
  mask[:, :3] = 0                                   # left padding
  mask[1] = 0                                       # no steps at all
  mask[2, 3:] = 1                                   # contiguous to the row's end
  mask[3, :] = 0
  mask[3, [5, 9, 10, 14]] = 1                       # gaps
  rewards, values = (rng.normal(size=(n, t)).astype(np.float32) for _ in range(2))
  for gamma, lam in [(1.0, 1.0), (0.9, 0.95), (0.99, 0.0), (0.8, 0.5), (0.0, 0.7)]:
    adv, ret = GAE(rewards, values, mask, gamma, lam)
    expected = [np_gae(rewards[i], values[i], mask[i], gamma, lam) for i in range(n)]
    np.testing.assert_allclose(adv, [e[0] for e in expected], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, [e[1] for e in expected], rtol=1e-5, atol=1e-5)
    assert not np.asarray(adv)[mask == 0].any() and not np.asarray(ret)[mask == 0].any()
    # The tests tell gamma, lambda and the gap handling apart.
    nudge = lambda x: x - 0.1 if x >= 0.5 else x + 0.1
    mutants = [dict(gamma=nudge(gamma))]
    if gamma:                        # (with gamma = 0 neither lambda nor the gaps have an effect)
      mutants += [dict(lam=nudge(lam)), dict(skip_gaps=False)]
    for mutant in mutants:
      kwargs = {"gamma": gamma, "lam": lam, **mutant}
      _differs([np_gae(rewards[i], values[i], mask[i], **kwargs)[0] for i in range(n)], adv,
               (gamma, lam, mutant))
  # Closed forms. gamma = lam = 1: the sum of the future steps' rewards minus V.
  adv, ret = GAE(rewards, values, mask, 1.0, 1.0)
  # lam = 0: one-step TD, r_t + gamma V(next step) - V_t, V = 0 after the last step.
  td, _ = GAE(rewards, values, mask, 0.9, 0.0)
  for i in range(n):
    steps = [s for s in range(t) if mask[i, s]]
    for k, s in enumerate(steps):
      future = sum(float(rewards[i, u]) for u in steps[k:])
      np.testing.assert_allclose(adv[i, s], future - values[i, s], rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(ret[i, s], future, rtol=1e-5, atol=1e-5)
      next_value = float(values[i, steps[k + 1]]) if k + 1 < len(steps) else 0.0
      np.testing.assert_allclose(td[i, s], rewards[i, s] + 0.9 * next_value - values[i, s],
                                 rtol=1e-5, atol=1e-5)


def test_token_rewards_matches_numpy(data):
  on = data["on"].astype(np.float32)
  mask = on.copy()
  mask[0, [5, 6]] = 0                               # a gap: the last step is still the last one
  kl = data["behaviour"] - data["reference"]
  fn = jax.jit(token_rewards)
  for m in (on, mask):
    for kl_coef in (0.0, 0.3):
      got = fn(jnp.asarray(data["rewards"]), jnp.asarray(m), jnp.asarray(kl), kl_coef)
      expected = np_token_rewards(data["rewards"], m, kl.astype(np.float64), kl_coef)
      np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  got = jax.jit(token_rewards)(jnp.asarray(data["rewards"]), jnp.asarray(on))
  np.testing.assert_allclose(got, np_token_rewards(data["rewards"], on, kl, 0.0), rtol=1e-6)
  assert not np.asarray(got)[4].any()               # the empty completion's reward has no step
  np.testing.assert_allclose(np.asarray(got).sum(1)[[0, 1, 2, 3, 5]],
                             data["rewards"][[0, 1, 2, 3, 5]], rtol=1e-6)


# ---- the prepare stage ---------------------------------------------------------------------------

PREPARE_CASES = {"default": dict(), "kl_whiten": dict(gamma=0.95, lam=0.9, kl_coef=0.1),
                 "raw": dict(gamma=0.9, lam=0.8, kl_coef=0.05, whiten=False)}
PREPARE = {}
for _case, _kwargs in PREPARE_CASES.items():
  def _prepare(params, moves, judgments, prepare=ppo_prepare(**_kwargs)):
    return prepare(params, Play(ac_apply, moves, judgments, jax.random.PRNGKey(0)))
  PREPARE[_case] = jax.jit(_prepare)


def _prepared(case, params, data, judgments):
  """The prepare stage under jax.jit, compiled once per case and judgments structure."""
  play = _play(data, judgments)
  return PREPARE[case](params, play.moves, play.judgments)


@pytest.mark.parametrize("case", sorted(PREPARE_CASES))
def test_ppo_prepare_matches_numpy(data, case):
  kwargs = {"gamma": 1.0, "lam": 0.95, "kl_coef": 0.0, "whiten": True, **PREPARE_CASES[case]}
  judgments = {"agent/rewards": data["rewards"], "behaviour_logprobs": data["behaviour"],
               "reference_token_logprobs": data["reference"]}
  got = _prepared(case, _params(data["old_table"], data["old_values"]), data, judgments)
  expected = np_prepare(data, data["old_values"].astype(np.float64), **kwargs)
  assert set(got) == {"agent/advantages", "agent/returns", "agent/old_values"}
  for k in expected:
    np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-5, err_msg=k)
  adv = np.asarray(got["agent/advantages"])[data["on"]]
  if kwargs["whiten"]:
    np.testing.assert_allclose([adv.mean(), adv.std()], [0.0, 1.0], atol=1e-5)
  mutants = [dict(gamma=0.9 * kwargs["gamma"]), dict(lam=0.9 * kwargs["lam"] + 0.05),
             dict(kl_coef=kwargs["kl_coef"] + 0.05), dict(whiten=not kwargs["whiten"])]
  if kwargs["whiten"]:
    mutants.append(dict(var_ddof=1))
  for mutant in mutants:
    mutated = np_prepare(data, data["old_values"].astype(np.float64), **{**kwargs, **mutant})
    _differs(mutated["agent/advantages"], got["agent/advantages"], mutant)


def test_prepare_is_constant_and_reads_only_the_keys_it_needs(data):
  params = _params(data["old_table"], data["old_values"])
  play = _play(data, {"agent/rewards": data["rewards"]})   # kl_coef = 0: no log-probs needed
  prepared = lambda p: PREPARE["default"](p, play.moves, play.judgments)
  grad = jax.jit(jax.grad(lambda p: sum(x.sum() for x in prepared(p).values())))(params)
  for k, g in grad.items():
    np.testing.assert_array_equal(g, np.zeros_like(g), err_msg=k)
  # ppo_advantages is the same function of the values, which get no gradient either.
  values = jnp.asarray(data["old_values"])[play.moves.tokens]
  g = jax.grad(lambda v: ppo_advantages(v, play)["agent/returns"].sum())(values)
  np.testing.assert_array_equal(g, np.zeros_like(g))


def test_nonfinite_reward_makes_the_advantages_nonfinite(data):
  params = _params(data["old_table"], data["old_values"])
  for bad in (np.nan, np.inf):
    for row in (2, 4):                              # row 4's completion is empty
      rewards = data["rewards"].copy()
      rewards[row] = bad
      got = _prepared("default", params, data, {"agent/rewards": rewards})
      assert np.isnan(np.asarray(got["agent/advantages"])).all(), (bad, row)


# ---- the PPO payoff ------------------------------------------------------------------------------

PPO_CASES = {"default": dict(),
             "entropy": dict(clip_eps=0.1, value_clip_eps=0.3, value_coef=1.0, entropy_coef=0.05),
             "no_value_clip": dict(value_clip_eps=None, value_coef=0.25, entropy_coef=0.01)}
PPO = {case: ppo(**kwargs) for case, kwargs in PPO_CASES.items()}
_COMPILED = {}


def _run(payoff, data, judgments, params=None):
  """(value, metrics, d value / d params) of the payoff under jax.jit, compiled once per payoff."""
  def value(params, judgments):
    return payoff(params, _play(data, judgments))
  if payoff not in _COMPILED:
    _COMPILED[payoff] = jax.jit(jax.value_and_grad(value, has_aux=True))
  params = params or _params(data["table"], data["values"])
  (v, metrics), grad = _COMPILED[payoff](params, {k: jnp.asarray(x) for k, x in judgments.items()})
  return float(v), {k: float(m) for k, m in metrics.items()}, jax.tree.map(np.asarray, grad)


def _fd_grad(reference_value, table, values, h=1e-6):
  """Central finite differences of a float64 reference over every entry of both tables."""
  table, values = table.astype(np.float64), values.astype(np.float64)
  grads = {"table": np.zeros_like(table), "values": np.zeros_like(values)}
  for name, x in (("table", table), ("values", values)):
    for idx in np.ndindex(x.shape):
      up, down = x.copy(), x.copy()
      up[idx] += h
      down[idx] -= h
      args = lambda y: (y, values) if name == "table" else (table, y)
      grads[name][idx] = (reference_value(*args(up)) - reference_value(*args(down))) / (2 * h)
  return grads


def _ppo_judgments(data, behaviour="behaviour"):
  return {"behaviour_logprobs": data[behaviour], **data["prepared"]}


@pytest.mark.parametrize("case", sorted(PPO_CASES))
def test_ppo_matches_numpy(data, case):
  kwargs = PPO_CASES[case]
  judgments = _ppo_judgments(data)
  value, metrics, grad = _run(PPO[case], data, judgments)
  reference = lambda table, values: np_ppo(table, values, data, judgments, **kwargs)
  t64, v64 = data["table"].astype(np.float64), data["values"].astype(np.float64)
  np.testing.assert_allclose(value, reference(t64, v64), rtol=1e-5, atol=1e-6)
  expected = _fd_grad(reference, data["table"], data["values"])
  for k in expected:
    assert np.abs(expected[k]).max() > 1e-2, k
    np.testing.assert_allclose(grad[k], expected[k], rtol=1e-4, atol=2e-5, err_msg=k)
  _assert_metrics(metrics, np_ppo(t64, v64, data, judgments, metrics=True, **kwargs)[1])
  assert 0.1 < metrics["clip_fraction"] < 0.9       # the policy clip is active
  if kwargs.get("value_clip_eps", 0.2) is not None:
    assert 0.1 < metrics["value_clip_fraction"] < 0.9
  else:
    assert metrics["value_clip_fraction"] == 0.0


def test_ppo_references_are_sensitive_to_each_formula_detail(data):
  judgments = _ppo_judgments(data)
  value = _run(PPO["default"], data, judgments)[0]
  t64, v64 = data["table"].astype(np.float64), data["values"].astype(np.float64)
  mutants = [dict(value_clip_eps=None), dict(value_clip_eps=0.25), dict(value_max=False),
             dict(clip_eps=0.25), dict(value_coef=0.55), dict(entropy_coef=0.01)]
  for mutant in mutants:
    assert abs(np_ppo(t64, v64, data, judgments, **mutant) - value) > 20 * (1e-5 * abs(value)
                                                                           + 1e-6), mutant
  # The gradient too: without the value clip, every critic entry would get its gradient.
  grad = _run(PPO["default"], data, judgments)[2]
  unclipped = _fd_grad(lambda t, v: np_ppo(t, v, data, judgments, value_clip_eps=None),
                       data["table"], data["values"])
  assert np.abs(unclipped["values"] - grad["values"]).max() > 1e-3


def test_prepare_then_ppo_on_policy(data):
  """The step's two stages at the rollout's own params: ratio 1, nothing clipped, KL 0, and the
  payoff is mean A - value_coef * 0.5 * mean (V - R)^2 with the prepared A and R."""
  params = _params(data["table"], data["values"])
  judgments = {"agent/rewards": data["rewards"], "behaviour_logprobs": data["on_policy"],
               "reference_token_logprobs": data["reference"]}
  prepared = _prepared("kl_whiten", params, data, judgments)
  value, metrics, _ = _run(PPO["default"], data, {"behaviour_logprobs": data["on_policy"],
                                                  **prepared}, params)
  assert metrics["clip_fraction"] == metrics["value_clip_fraction"] == 0.0
  np.testing.assert_allclose([metrics["ratio_mean"], metrics["approx_kl"]], [1.0, 0.0], atol=1e-6)
  expected = np_prepare(data, data["values"].astype(np.float64), gamma=0.95, lam=0.9, kl_coef=0.1,
                        whiten=True, behaviour="on_policy")
  on = data["on"]
  adv, ret, vals = (expected[k][on] for k in ("agent/advantages", "agent/returns", "agent/old_values"))
  np.testing.assert_allclose(value, adv.mean() - 0.5 * 0.5 * np.mean((vals - ret) ** 2),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(metrics["explained_variance"],
                             1 - np.var(ret - vals) / np.var(ret), rtol=1e-4)


def test_judgments_get_no_gradient(data):
  params = _params(data["table"], data["values"])
  judgments = {k: jnp.asarray(v) for k, v in _ppo_judgments(data).items()}
  g = jax.jit(jax.grad(lambda j: PPO["entropy"](params, _play(data, j))[0]))(judgments)
  for k, v in g.items():
    np.testing.assert_array_equal(v, np.zeros_like(v), err_msg=k)


# ---- errors --------------------------------------------------------------------------------------

def test_errors(data):
  for kwargs, match in [(dict(clip_eps=0.0), "clip_eps"), (dict(value_clip_eps=0.0), "value_clip"),
                        (dict(value_coef=-1.0), "value_coef"),
                        (dict(entropy_coef=-0.1), "entropy_coef")]:
    with pytest.raises(ValueError, match=match):
      ppo(**kwargs)
  for kwargs, match in [(dict(gamma=1.1), "gamma"), (dict(lam=-0.1), "lam"),
                        (dict(kl_coef=-1.0), "kl_coef")]:
    with pytest.raises(ValueError, match=match):
      ppo_prepare(**kwargs)
  params = _params(data["table"], data["values"])
  full = _ppo_judgments(data)
  payoff = PPO["default"]
  for key in ("agent/advantages", "agent/returns", "agent/old_values", "behaviour_logprobs"):
    with pytest.raises(KeyError, match=key):
      payoff(params, _play(data, {k: v for k, v in full.items() if k != key}))
  with pytest.raises(KeyError, match="rewards"):
    ppo_prepare()(params, _play(data, {}))
  with pytest.raises(KeyError, match="reference_token_logprobs"):
    ppo_prepare(kl_coef=0.1)(params, _play(data, {"agent/rewards": data["rewards"],
                                                  "behaviour_logprobs": data["behaviour"]}))
  logits_only = _play(data, full)._replace(apply=lambda p, *args: ac_apply(p, *args)[0])
  with pytest.raises(TypeError, match=r"\(logits_BTV, values_BT\)"):
    payoff(params, logits_only)


def test_actor_critic_shares_the_policy_forward_pass():
  """policy_value.apply: the same logits as the plain policy, values from the head on the trunk."""
  from gamejax.models import llama, policy_value
  cfg = llama.LlamaConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)
  params = policy_value.init_params(cfg, jax.random.PRNGKey(0))
  params["value"] = {"w": jnp.arange(16.0) / 16, "b": jnp.asarray(0.5)}
  tokens = jnp.asarray([[1, 5, 7, 9]])
  positions, segments = jnp.arange(4)[None], jnp.ones((1, 4), jnp.int32)
  logits, values = jax.jit(functools.partial(policy_value.apply, cfg))(params, tokens, positions,
                                                                       segments)
  np.testing.assert_allclose(logits, llama.apply(cfg, params["policy"], tokens, positions, segments),
                             rtol=1e-5, atol=1e-5)
  hidden = np.asarray(llama.hidden(cfg, params["policy"], tokens, positions, segments), np.float64)
  np.testing.assert_allclose(values, hidden @ (np.arange(16.0) / 16) + 0.5, rtol=1e-5, atol=1e-5)
  assert policy_value.policy_params(params) is params["policy"]
