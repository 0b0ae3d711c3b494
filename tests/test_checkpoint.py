"""Checkpoints write the frozen players that never change once, beside the step checkpoints."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gamejax import step as game_step
from gamejax.checkpoint import CheckpointError, Checkpointer


def _state(step, reference):
  return game_step.GameState(
      params={"agent": {"w": jnp.full((4, 4), float(step))}}, opt_state={},
      frozen={"reference": {"w": reference}, "magnet": {"w": jnp.full((4, 4), -float(step))}},
      rng=jax.random.PRNGKey(0), step=jnp.asarray(step, jnp.int32))


def _bytes(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_constant_frozen_players_are_written_once_and_restored(tmp_path):
  big = jnp.arange(200_000, dtype=jnp.float32).reshape(400, 500)
  ckpt = Checkpointer(str(tmp_path / "stage"), keep=3, constant=("reference",))
  ckpt.save(1, _state(1, big), {"data": {}})
  ckpt.save(2, _state(2, big + 1.0), {"data": {}})     # not written again: it never changes
  frozen_dir = tmp_path / "stage.frozen"
  assert _bytes(frozen_dir) > big.nbytes / 2
  for step in (1, 2):                                  # the step checkpoints do not hold it
    assert _bytes(tmp_path / "stage" / str(step)) < big.nbytes / 4
  abstract = jax.eval_shape(lambda: _state(0, big))
  state, _ = ckpt.restore(abstract)
  assert int(state.step) == 2
  np.testing.assert_array_equal(state.frozen["reference"]["w"], big)
  np.testing.assert_array_equal(state.frozen["magnet"]["w"], -2.0)
  np.testing.assert_array_equal(state.params["agent"]["w"], 2.0)
  ckpt.close()
  # Without its frozen players, a checkpoint cannot be restored: the error names it.
  os.rename(frozen_dir, tmp_path / "elsewhere")
  again = Checkpointer(str(tmp_path / "stage"), keep=3, constant=("reference",))
  with pytest.raises(CheckpointError, match="cannot restore checkpoint step 2"):
    again.restore(abstract)
  again.close()


def test_a_checkpoint_written_before_weights_were_stored_fused_restores_fused(tmp_path):
  """A checkpoint holding ``wq``, ``wk``, ``wv``, ``w_gate``, ``w_up`` (params, Adam's moments and a
  frozen reference written once) restores into the fused tree, bit for bit the state it was, and
  LoRA adapters named by the standard weights (``wq: {a, b}``, ...) stay as they are; without the
  model's fused specs it fails with the checkpoint named, as before."""
  import optax
  from gamejax import sharding
  from gamejax.checkpoint import standard_target
  from gamejax.models import fusion, lm
  from gamejax.models.llama import LlamaConfig
  cfg = LlamaConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32)
  specs = lm.fused_storage(cfg)
  params = lm.init_params(cfg, jax.random.PRNGKey(0))
  opt = optax.adamw(1e-2)
  grads = jax.tree.map(jnp.ones_like, params)
  opt_state = opt.update(grads, opt.init(params), params)[1]      # moments that are not zeros
  adapter = lambda: {"a": jnp.ones((16, 2)), "b": jnp.full((2, 16), 0.5)}
  adapters = {"block_0": {"attn": {"wq": adapter(), "wk": adapter(), "wv": adapter()}}}
  state = game_step.GameState(
      params={"agent": params, "lora": adapters}, opt_state={"agent": opt_state},
      frozen={"reference": jax.tree.map(lambda x: x + 1.0, params)},
      rng=jax.random.PRNGKey(3), step=jnp.asarray(7, jnp.int32))
  unfused = fusion.unfuse(state, specs)
  assert "wq" in unfused.opt_state["agent"][0].mu["block_1"]["attn"]
  old = Checkpointer(str(tmp_path / "stage"), constant=("reference",))
  old.save(7, unfused, {"data": {"position": 3}}, wait=True)
  old.close()
  mesh = sharding.make_mesh(1, 1)
  here = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=here), state)
  assert jax.tree.structure(standard_target(target, specs)) == jax.tree.structure(unfused)

  new = Checkpointer(str(tmp_path / "stage"), constant=("reference",), fused=specs)
  restored, extra = new.restore(target)
  new.close()
  assert extra == {"data": {"position": 3}}
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  plain = Checkpointer(str(tmp_path / "stage"), constant=("reference",))
  with pytest.raises(CheckpointError, match="cannot restore checkpoint step 7"):
    plain.restore(target)
  plain.close()
