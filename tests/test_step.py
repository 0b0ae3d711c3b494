"""The compiled game step: traces once, trains, guards NaNs, and shards without changing results."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

import eight_devices
from gamejax import sharding, step as game_step
from gamejax.models import llama
from gamejax.payoffs import imitation

TINY = llama.LlamaConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)


def _batches(k, b, t, seed):
  """Packed copy-task records: the agent repeats the opponent's 4 tokens."""
  rng = np.random.default_rng(seed)
  tokens = np.zeros((k, b, t), np.int32)
  players = np.zeros((k, b, t), np.int32)
  segments = np.zeros((k, b, t), np.int32)
  positions = np.zeros((k, b, t), np.int32)
  for i in range(k):
    for r in range(b):
      col, seg = 0, 1
      while col + 9 <= t:
        q = rng.integers(3, 32, 4)
        tokens[i, r, col:col + 9] = np.concatenate([[1], q, q])
        players[i, r, col:col + 5], players[i, r, col + 5:col + 9] = 2, 1
        segments[i, r, col:col + 9] = seg
        positions[i, r, col:col + 9] = np.arange(9)
        col, seg = col + 9, seg + 1
  return dict(tokens=tokens, positions=positions, segment_ids=segments, players=players)


def _setup(mesh, payoff=None, lr=3e-3):
  learner = game_step.Learner(functools.partial(llama.apply, TINY), payoff or imitation(("agent",)),
                              optax.adam(lr))
  game = game_step.Game(learners={"agent": learner})
  params = llama.init_params(TINY, jax.random.PRNGKey(0))
  state = game_step.init_state(game, {"agent": params}, jax.random.PRNGKey(1))
  traces = []
  fn, shardings = game_step.make_step(game, mesh, jax.eval_shape(lambda: state),
                                      on_trace=lambda: traces.append(1))
  return fn, jax.device_put(state, shardings), traces


def test_step_traces_once_over_100_steps_and_learns():
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  fn, state, traces = _setup(mesh)
  first = None
  for call in range(25):                       # 25 calls x 4 scanned steps = 100 game steps
    state, metrics = fn(state, _batches(4, 8, 36, call))
    if first is None:
      first = float(metrics["loss"][0])
  assert int(state.step) == 100
  assert len(traces) == 1
  assert float(metrics["loss"][-1]) < 0.5 * first      # the copy task is being learnt


def test_nonfinite_payoff_never_reaches_params():
  mesh = sharding.make_mesh(devices=jax.devices()[:1])

  def nan_payoff(params, play):
    value, m = imitation(("agent",))(params, play)
    return value * jnp.nan, m

  fn, state, _ = _setup(mesh, payoff=nan_payoff)
  before = jax.device_get((state.params, state.opt_state))
  state, metrics = fn(state, _batches(2, 8, 36, 0))
  after = jax.device_get((state.params, state.opt_state))
  jax.tree.map(np.testing.assert_array_equal, before, after)   # Adam's moments and count too
  np.testing.assert_array_equal(metrics["agent/skipped_nonfinite"], [1.0, 1.0])
  assert int(state.step) == 2


def test_finite_payoff_with_infinite_gradient_never_reaches_params():
  """sqrt at 0: the payoff is finite, its gradient infinite; the guard reads the gradient too."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])

  def steep_payoff(params, play):
    value, m = imitation(("agent",))(params, play)
    scale = params["final_norm"]["scale"]
    kink = jnp.sqrt(scale - jax.lax.stop_gradient(scale))
    return value + kink.sum(), m

  fn, state, _ = _setup(mesh, payoff=steep_payoff)
  before = jax.device_get(state.params)
  state, metrics = fn(state, _batches(2, 8, 36, 0))
  assert np.isfinite(metrics["agent/loss"]).all()
  assert not np.isfinite(metrics["agent/grad_norm"]).any()
  np.testing.assert_array_equal(metrics["agent/skipped_nonfinite"], [1.0, 1.0])
  jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(state.params))


def test_the_compiled_step_updates_params_and_optimizer_state_in_place():
  """The state is donated and updated in place: no array of a parameter's shape is copied
  anywhere in the compiled step. (A guard that selected between the new and the old state made
  XLA copy every Adam moment, every step.)"""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  fn, state, _ = _setup(mesh)
  text = fn.lower(state, _batches(2, 8, 36, 0)).compile().as_text()
  shapes = {tuple(x.shape) for x in jax.tree.leaves(state.params) if x.size > 64}
  copied = [dims for dims in re.findall(r"= f32\[([\d,]*)\]\S* copy\(", text)
            if tuple(int(d) for d in dims.split(",")) in shapes]
  assert not copied, copied


def run_on(mesh):
  """Three calls of the pre-training step on ``mesh`` (``eight_devices`` compares meshes)."""
  fn, state, _ = _setup(mesh)
  for call in range(3):
    state, metrics = fn(state, _batches(2, 8, 36, call))
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(state.params)}
  for axis in ("fsdp", "tensor"):
    assert any(axis in s for s in specs) == (mesh.shape[axis] > 1), (axis, specs)
  return np.asarray(metrics["loss"]), jax.device_get(state.params)


def test_eight_device_step_equals_one_device():
  eight_devices.assert_eight_devices_match_one("test_step", timeout=300,
                                              meshes=eight_devices.DATA_AND_ALL_AXES)


def test_prepare_then_minibatch_epochs_visit_every_row_once_per_epoch():
  """With SGD and a payoff linear in the params, E epochs of M minibatch updates move the params
  by lr * E * M * (mean row feature) whatever the random partition: each row once per epoch.
  ``prepare`` sees the pre-update params and its judgments reach every minibatch."""
  rows, epochs, minibatches, lr = 8, 3, 4, 0.1
  rng = np.random.default_rng(0)
  x = rng.normal(size=(rows, 1, 5)).astype(np.float32)
  record = dict(tokens=np.zeros((rows, 1), np.int32), positions=np.zeros((rows, 1), np.int32),
                segment_ids=np.ones((rows, 1), np.int32), players=np.ones((rows, 1), np.int32))

  def payoff(params, play):
    feats = play.judgments["features"][:, 0]                # [rows / M, 5]
    shift = play.judgments["prepared_shift"]                # from prepare, per row
    return (feats @ params["w"]).mean() + 0.0 * shift.sum(), {"rows": feats.shape[0] * 1.0}

  def prepare(params, play):
    return {"prepared_shift": jnp.broadcast_to(params["w"].sum(), (rows,))}

  learner = game_step.Learner(lambda *a: None, payoff, optax.sgd(lr), prepare=prepare,
                              epochs=epochs, minibatches=minibatches)
  game = game_step.Game({"agent": learner},
                        play=lambda state, batch, rng: (game_step.GameRecord(**batch["record"]),
                                                        {"features": batch["x"]}))
  w0 = np.zeros(5, np.float32)
  state = game_step.init_state(game, {"agent": {"w": jnp.asarray(w0)}}, jax.random.PRNGKey(0))
  state, metrics = jax.jit(functools.partial(game_step.game_step, game))(
      state, {"record": record, "x": x})
  want = w0 + lr * epochs * minibatches * x[:, 0].mean(axis=0)
  np.testing.assert_allclose(state.params["agent"]["w"], want, rtol=1e-5)
  assert float(metrics["agent/rows"]) == rows // minibatches
