"""Memory and speed knobs: block rematerialisation, bf16 compute on f32 master weights, gradient
accumulation. Each must leave the results as they were (or within the compute dtype's rounding)."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gamejax import sharding, step as game_step
from gamejax.models import gpt2, llama, qwen3
from gamejax.payoffs import imitation
from gamejax.records import GameRecord

TINY = {
    "llama": llama.LlamaConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                               d_ff=64),
    "gpt2": gpt2.GPT2Config(vocab_size=32, d_model=32, n_layers=2, n_heads=4, max_positions=16),
}
FAMILY = {"llama": llama, "gpt2": gpt2}


def _records(rows, t, seed, k=None, ragged=False):
  """Copy-task records (the agent repeats the opponent's 4 tokens), every row laid out alike, so
  every row holds the same number of agent tokens; ``ragged``: row ``r`` keeps ``r % 3 + 1``
  segments, so rows hold different numbers of them."""
  rng = np.random.default_rng(seed)
  shape = (rows, t) if k is None else (k, rows, t)
  tokens, players, segments, positions = (np.zeros(shape, np.int32) for _ in range(4))
  for idx in np.ndindex(shape[:-1]):
    col, seg = 0, 1
    while col + 9 <= t and (not ragged or seg <= idx[-1] % 3 + 1):
      q = rng.integers(3, 32, 4)
      tokens[idx][col:col + 9] = np.concatenate([[1], q, q])
      players[idx][col:col + 5], players[idx][col + 5:col + 9] = 2, 1
      segments[idx][col:col + 9] = seg
      positions[idx][col:col + 9] = np.arange(9)
      col, seg = col + 9, seg + 1
  return dict(tokens=tokens, positions=positions, segment_ids=segments, players=players)


# ---------------------------------------------------------------------------------------------
# Rematerialisation.

@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_remat_keeps_params_loss_and_grads_and_keeps_fewer_residuals(family):
  """Every policy: the same param paths (HF import/export maps them by name), the same loss and
  gradients under jit, and fewer bytes held for the backward ("full" < "dots" < "none")."""
  mod, base = FAMILY[family], TINY[family]
  params = mod.init_params(base, jax.random.key(0))
  r = _records(2, 16, 0)
  paths = lambda tree: [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]

  def loss(cfg):
    def f(p):
      logits = mod.apply(cfg, p, r["tokens"], r["positions"], r["segment_ids"])
      return -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]),
                                  r["tokens"][:, 1:, None], axis=-1).mean()
    return f

  want_loss, want_grads = jax.jit(jax.value_and_grad(loss(base)))(params)
  held = {}
  for remat in ("none", "full", "dots"):
    cfg = dataclasses.replace(base, remat=remat)
    assert paths(jax.eval_shape(lambda k: mod.init_params(cfg, k), jax.random.key(0))) == paths(
        params)
    if remat != "none":
      got_loss, got_grads = jax.jit(jax.value_and_grad(loss(cfg)))(params)
      np.testing.assert_allclose(got_loss, want_loss, rtol=0, atol=1e-6)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), got_grads,
                   want_grads)
    # The leaves of the VJP closure are what the backward holds (traced, not run).
    backward = jax.eval_shape(lambda p: jax.vjp(loss(cfg), p)[1], params)
    held[remat] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(backward))
  assert held["full"] < held["dots"] < held["none"], held


def test_unknown_remat_policy_is_a_config_error_naming_field_and_choices():
  with pytest.raises(llama.LlamaConfigError,
                     match=r"LlamaConfig\.remat='all' must be one of \['dots', 'full', 'none'\]"):
    llama.LlamaConfig(remat="all")
  with pytest.raises(llama.LlamaConfigError, match=r"Qwen3Config\.remat='dot'"):
    qwen3.Qwen3Config(remat="dot")
  with pytest.raises(gpt2.GPT2ConfigError, match=r"GPT2Config\.remat=None must be one of"):
    gpt2.GPT2Config(remat=None)


# ---------------------------------------------------------------------------------------------
# bf16 compute, f32 master weights.

def _dot_operands(jaxpr):
  """``(operand dtypes, precision)`` of every ``dot_general`` in ``jaxpr`` and its sub-jaxprs
  (custom-VJP kernels, checkpoints)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield tuple(str(v.aval.dtype) for v in eqn.invars), eqn.params.get("precision")
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from _dot_operands(sub)


def test_bf16_compute_with_f32_master_weights_trains():
  """``dtype='bfloat16', param_dtype='float32'``: the matmuls take bf16 operands (the logits
  differ from f32 compute by bf16 rounding only), params and Adam's moments stay float32 through
  compiled steps, and the loss falls."""
  f32 = TINY["llama"]
  bf16 = dataclasses.replace(f32, dtype="bfloat16")
  params = llama.init_params(bf16, jax.random.key(0))
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  r = _records(4, 18, 0)
  inputs = (r["tokens"], r["positions"], r["segment_ids"])
  logits = {cfg.dtype: jax.jit(functools.partial(llama.apply, cfg))(params, *inputs)
            for cfg in (f32, bf16)}
  assert logits["bfloat16"].dtype == jnp.float32          # the LM head accumulates in f32
  diff = float(jnp.abs(logits["bfloat16"] - logits["float32"]).max())
  scale = float(jnp.abs(logits["float32"]).max())
  assert 0 < diff < 2 ** -6 * scale, (diff, scale)        # rounded as bf16 (8 bits), no worse
  # Every matmul takes bf16 operands (6 per block and the LM head), but RoPE's tables' product
  # with the identity (exact, at HIGHEST precision in float32).
  jaxpr = jax.make_jaxpr(functools.partial(llama.apply, bf16))(params, *inputs).jaxpr
  dots = [(dtypes, precision) for dtypes, precision in _dot_operands(jaxpr)
          if precision != (jax.lax.Precision.HIGHEST,) * 2]
  assert len(dots) == 6 * bf16.n_layers + 1, dots
  assert all(dtypes == ("bfloat16", "bfloat16") for dtypes, _ in dots), dots

  learner = game_step.Learner(functools.partial(llama.apply, bf16), imitation(("agent",)),
                              optax.adam(1e-2))
  game = game_step.Game(learners={"agent": learner})
  state = game_step.init_state(game, {"agent": params}, jax.random.key(1))
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  fn, shardings = game_step.make_step(game, mesh, jax.eval_shape(lambda: state))
  state = jax.device_put(state, shardings)
  losses = []
  for call in range(6):
    state, metrics = fn(state, _records(8, 36, call, k=4))
    losses.extend(np.asarray(metrics["loss"]).tolist())
  for tree in (state.params, state.opt_state):
    floats = {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}
    assert floats == {jnp.dtype(jnp.float32)}, floats
  assert np.isfinite(losses).all() and np.mean(losses[-4:]) < 0.9 * np.mean(losses[:4]), losses


# ---------------------------------------------------------------------------------------------
# Gradient accumulation.

def _sgd_step(accumulate, lr=0.1, payoff=None):
  learner = game_step.Learner(functools.partial(llama.apply, TINY["llama"]),
                              payoff or imitation(("agent",)), optax.sgd(lr),
                              accumulate=accumulate)
  game = game_step.Game(learners={"agent": learner})
  return game, jax.jit(functools.partial(game_step.game_step, game))


def test_accumulated_update_equals_the_full_batch_update():
  """Imitation (a token mean) on rows with equal agent tokens per microbatch: 4 microbatches of
  2 rows give the one-pass update (SGD, so the params compare the gradients themselves), loss
  and token count; on ragged rows the accumulated gradient is the mean of the microbatches'
  token-mean gradients (as documented), which differs from the full batch's."""
  params = llama.init_params(TINY["llama"], jax.random.key(0))
  (game1, one_pass), (game4, accumulated) = _sgd_step(1), _sgd_step(4)
  state1 = game_step.init_state(game1, {"agent": params}, jax.random.key(1))
  state4 = game_step.init_state(game4, {"agent": params}, jax.random.key(1))
  batch = _records(8, 36, 0)
  new1, m1 = one_pass(state1, batch)
  new4, m4 = accumulated(state4, batch)
  moved = max(float(jnp.abs(a - b).max()) for a, b in
              zip(jax.tree.leaves(new1.params), jax.tree.leaves(params)))
  assert moved > 1e-3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
               new4.params, new1.params)
  np.testing.assert_allclose(m4["agent/loss"], m1["agent/loss"], rtol=0, atol=1e-6)
  assert float(m4["agent/tokens"]) == float(m1["agent/tokens"]) == 8 * 4 * 4   # summed, not averaged

  ragged = _records(8, 36, 1, ragged=True)
  new4, _ = accumulated(state4, ragged)
  new1, _ = one_pass(state1, ragged)
  per_micro = [one_pass(state1, {k: v[2 * j:2 * j + 2] for k, v in ragged.items()})[0].params
               for j in range(4)]
  mean_of_micro = jax.tree.map(lambda *xs: sum(xs) / 4, *per_micro)   # SGD: linear in the grads
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
               new4.params, mean_of_micro)
  assert max(float(jnp.abs(a - b).max()) for a, b in
             zip(jax.tree.leaves(new4.params), jax.tree.leaves(new1.params))) > 1e-5


def _linear_game(rows, payoff, **learner):
  record = dict(tokens=np.zeros((rows, 1), np.int32), positions=np.zeros((rows, 1), np.int32),
                segment_ids=np.ones((rows, 1), np.int32), players=np.ones((rows, 1), np.int32))
  learner = game_step.Learner(lambda *a: None, payoff, optax.sgd(0.1), **learner)
  game = game_step.Game({"agent": learner},
                        play=lambda state, batch, rng: (GameRecord(**batch["record"]),
                                                        {"features": batch["x"]}))
  state = game_step.init_state(game, {"agent": {"w": jnp.zeros(5)}}, jax.random.key(0))
  step = jax.jit(functools.partial(game_step.game_step, game))
  return lambda x: step(state, {"record": record, "x": x})


def test_accumulation_composes_with_prepare_and_minibatch_epochs():
  """E epochs x M minibatches, each accumulated over A microbatches, of a row-mean payoff linear
  in the params: the params move by lr * E * M * (mean row feature), the payoff sees rows / (M A)
  rows at a time, and ``prepare``'s judgments reach every microbatch."""
  rows, epochs, minibatches, accumulate = 16, 3, 2, 4
  x = np.random.default_rng(0).normal(size=(rows, 1, 5)).astype(np.float32)

  def payoff(params, play):
    feats = play.judgments["features"][:, 0]
    shift = play.judgments["prepared_shift"]
    return (feats @ params["w"]).mean() + 0.0 * shift.sum(), {"rows": feats.shape[0] * 1.0}

  prepare = lambda params, play: {"prepared_shift": jnp.broadcast_to(params["w"].sum(), (rows,))}
  state, metrics = _linear_game(rows, payoff, prepare=prepare, epochs=epochs,
                                minibatches=minibatches, accumulate=accumulate)(x)
  np.testing.assert_allclose(state.params["agent"]["w"],
                             0.1 * epochs * minibatches * x[:, 0].mean(axis=0), rtol=1e-5)
  assert float(metrics["agent/rows"]) == rows // (minibatches * accumulate)


def test_a_nonfinite_microbatch_skips_the_whole_update():
  """One microbatch's payoff is NaN: the averaged gradient would carry it, so nothing moves."""
  x = np.ones((8, 1, 5), np.float32)
  x[5, 0, 0] = np.nan                                # row 5: the third microbatch of four

  def payoff(params, play):
    return (play.judgments["features"][:, 0] @ params["w"]).mean(), {}

  state, metrics = _linear_game(8, payoff, accumulate=4)(x)
  np.testing.assert_array_equal(state.params["agent"]["w"], np.zeros(5))
  assert float(metrics["agent/skipped_nonfinite"]) == 1.0
  assert not np.isfinite(float(metrics["agent/loss"]))
  x[5, 0, 0] = 1.0
  state, metrics = _linear_game(8, payoff, accumulate=4)(x)
  np.testing.assert_allclose(state.params["agent"]["w"], np.full(5, 0.1))
  assert float(metrics["agent/skipped_nonfinite"]) == 0.0


def test_accumulation_keeps_preference_pairs_together():
  """``halves``: a preference batch (chosen rows, then rejected rows) splits into microbatches
  that are themselves such batches: pair ``i``'s rows land in the same microbatch, in place."""
  rows, accumulate = 12, 3
  pair = np.concatenate([np.arange(rows // 2)] * 2).astype(np.float32)
  x = np.broadcast_to(pair[:, None, None], (rows, 1, 5)).copy()

  def payoff(params, play):
    ids = play.judgments["features"][:, 0, 0]
    p = ids.shape[0] // 2
    return (play.judgments["features"][:, 0] @ params["w"]).mean(), {
        "split_pairs": (ids[:p] != ids[p:]).sum() * 1.0, "rows": ids.shape[0] * 1.0}

  _, metrics = _linear_game(rows, payoff, accumulate=accumulate, halves=True)(x)
  assert float(metrics["agent/split_pairs"]) == 0.0
  assert float(metrics["agent/rows"]) == rows // accumulate
  _, metrics = _linear_game(rows, payoff, accumulate=accumulate)(x)   # contiguous: pairs split
  assert float(metrics["agent/split_pairs"]) > 0
  with pytest.raises(ValueError, match="not a multiple of 2 x accumulate = 6"):
    game_step.microbatch_rows(9, 3, halves=True)
  with pytest.raises(ValueError, match=r"10 rows .* accumulate=4"):
    game_step.microbatch_rows(10, 4)


def test_grad_accumulation_is_set_from_the_stage_and_checked():
  """``Stage.grad_accumulation`` reaches the learner (``halves`` on preference data); a batch
  that does not split is a config error naming the stage and both numbers."""
  from gamejax import config, run
  stage = run.Stage(name="sft", data=config.arena(), payoff=imitation(("agent",)), steps=10,
                    batch_size=8, grad_accumulation=4)
  exp = run.Experiment(stages=[stage], model=dataclasses.replace(TINY["llama"], vocab_size=320))
  exp.validate()
  learner = run.stage_game(exp, 0).learners["agent"]
  assert (learner.accumulate, learner.halves) == (4, False)
  bad = dataclasses.replace(stage, batch_size=6)
  with pytest.raises(run.ExperimentError,
                     match=r"Stage 'sft': batch_size=6 \(6 records\) does not split into "
                           r"grad_accumulation=4"):
    run.Experiment(stages=[bad], model=exp.model).validate()
  with pytest.raises(run.ExperimentError, match=r"in each of minibatches=2; make batch_size a "
                                                r"multiple of 8"):
    run.Experiment(stages=[dataclasses.replace(bad, minibatches=2, grad_accumulation=4,
                                               batch_size=4)], model=exp.model).validate()
  with pytest.raises(run.ExperimentError, match="grad_accumulation must be positive, got 0"):
    run.Experiment(stages=[dataclasses.replace(stage, grad_accumulation=0)],
                   model=exp.model).validate()
  from gamejax.payoffs import dpo
  pairs = run.Stage(name="dpo", data=config.arena_preferences(), payoff=dpo(0.1), steps=10,
                    batch_size=8, grad_accumulation=8, reference=True)
  with pytest.raises(run.ExperimentError, match=r"batch_size=8 \(4 preference pairs\) does not "
                                                r"split into grad_accumulation=8"):
    run.Experiment(stages=[pairs], model=exp.model).validate()
  pairs = dataclasses.replace(pairs, grad_accumulation=2)
  exp = run.Experiment(stages=[pairs], model=exp.model)
  exp.validate()
  learner = run.stage_game(exp, 0).learners["agent"]
  assert (learner.accumulate, learner.halves) == (2, True)
