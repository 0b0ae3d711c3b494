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
