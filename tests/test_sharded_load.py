"""Checkpoints load straight into the mesh: each tensor is read, laid out and placed in its FSDP
sharding before the next is read (on 8 simulated devices); bfloat16 params train with float32
optimizer state when the optimizer asks for it."""
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np

from gamejax import config, run, sharding
from gamejax.interop import hf
from gamejax.models import fusion, llama
from gamejax.payoffs import imitation

CFG = llama.LlamaConfig(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                        tie_embeddings=False)

EIGHT = textwrap.dedent("""
    import sys, jax, numpy as np
    from jax.sharding import NamedSharding
    from gamejax import sharding
    from gamejax.interop import hf, load_checkpoint
    assert len(jax.devices()) == 8
    mesh = sharding.make_mesh(data=2, fsdp=4)
    cfg, want = hf.load(sys.argv[1])
    cfg2, got = load_checkpoint("hf:" + sys.argv[1], mesh=mesh)
    assert cfg2 == cfg
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
      spec = sharding.param_spec_at(sharding.path_keys(path), a.shape, dict(mesh.shape))
      assert isinstance(a.sharding, NamedSharding) and a.sharding.mesh == mesh, path
      assert a.sharding.spec == spec, (path, a.sharding.spec, spec)
      assert len(a.addressable_shards) == 8
      if "fsdp" in spec:
        assert a.addressable_shards[0].data.size == a.size // 4, path
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    print("SHARDED_LOAD_OK")
""")


def test_each_tensor_goes_straight_into_its_sharding_on_eight_devices(tmp_path):
  path = str(tmp_path / "model")
  hf.save(CFG, llama.init_params(CFG, jax.random.key(0)), path, max_shard_bytes=50_000)
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
  proc = subprocess.run([sys.executable, "-c", EIGHT, path], capture_output=True, text=True,
                        env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"), timeout=300)
  assert "SHARDED_LOAD_OK" in proc.stdout, proc.stdout + proc.stderr[-3000:]


def test_no_more_than_one_weight_is_on_the_host_at_a_time(tmp_path):
  """Each tensor is placed before the next is read, except the parts of one weight stored fused
  (q, k, v; gate, up), placed together once all are read."""
  path = str(tmp_path / "model")
  hf.save(CFG, llama.init_params(CFG, jax.random.key(0)), path)
  family, cfg = hf.model_config(path)
  files = hf._tensor_files(path)                 # pylint: disable=protected-access
  handle = hf._open(os.path.join(path, hf.SINGLE), "numpy")
  stored = {t.name: fusion.locate(t.path, llama.fused_storage(cfg))[0]
            for t in family.hf_tensors(cfg)}
  placed, held = [], []

  def read(name):
    held.append(name)
    assert len({stored[n] for n in held}) == 1, held   # only parts of one stored weight
    return handle.get_tensor(name)

  def place(p, x):
    assert [stored[n] for n in held] and all(stored[n] == tuple(p) for n in held), (p, held)
    held.clear()
    placed.append(tuple(p))
    assert isinstance(x, np.ndarray) and x.dtype == np.float32
    return jax.device_put(x)

  params = hf.assemble(family, cfg, files, read, path, place)
  assert not held and sorted(placed) == sorted(set(stored.values()))
  assert ("block_0", "attn", "wqkv") in placed and ("block_0", "mlp", "w_gate_up") in placed
  jax.tree.map(np.testing.assert_array_equal, params, hf.load(path)[1])


def test_bfloat16_params_train_with_float32_optimizer_state(tmp_path):
  model = llama.LlamaConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                            param_dtype="bfloat16")
  stage = run.Stage(name="sft", data=config.arena(players=[("perfect", 1.0)], num_train=100,
                                                   num_test=10),
                    payoff=imitation(["agent"]), steps=8, batch_size=4, seq_len=64,
                    steps_per_call=2, optimizer=run.Optimizer(state_dtype="float32",
                                                              learning_rate=1e-2, warmup_steps=0))
  exp = run.Experiment(stages=[stage], data_dir=str(tmp_path / "data"), model=model)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  result = run.run_stage(exp, 0, None, str(tmp_path / "run"), mesh, progress=False,
                         log=lambda _: None)
  assert {x.dtype for x in jax.tree.leaves(result.params)} == {np.dtype("bfloat16")}
  params, _ = run.restore_players(exp, 0, str(tmp_path / "run"))
  from gamejax.run import assembly
  game = assembly.stage_game(exp, 0)
  state = game.learners["agent"].optimizer.init(params["agent"])
  moments = [x for x in jax.tree.leaves(state) if np.ndim(x) > 0]
  assert moments and {x.dtype for x in moments} == {np.dtype("float32")}
  losses = [float(l.split('"loss": ')[1].split(",")[0])
            for l in open(tmp_path / "run" / "metrics.jsonl")]
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
