"""Runs a test module's compiled step on 1 simulated CPU device and on meshes of 8 in a subprocess
(the device count must be set before JAX starts) and checks that losses and params agree.

The module provides ``run_on(mesh) -> (loss array, params)``; it may make its own checks (e.g.
that the 8-device params are really sharded). Every mesh shape (data x fsdp x tensor) runs in the
one subprocess, so JAX starts once.
"""
import os
import subprocess
import sys
import textwrap

# data x fsdp x tensor: pure data parallel, FSDP, and FSDP with tensor parallelism (test_mesh runs
# the GRPO step on all three); other tests run on the first and the last (DATA_AND_ALL_AXES):
# rows split 8 ways, and every axis at once.
MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2))
DATA_AND_ALL_AXES = (MESHES[0], MESHES[-1])

SCRIPT = textwrap.dedent("""
    import importlib, sys
    sys.path.insert(0, %r)
    import jax, numpy as np
    from gamejax import sharding
    T = importlib.import_module(%r)
    assert len(jax.devices()) == 8, jax.devices()
    one = T.run_on(sharding.make_mesh(devices=jax.devices()[:1]))
    for shape in %r:
      got = T.run_on(sharding.make_mesh(*shape))
      np.testing.assert_allclose(one[0], got[0], rtol=1e-5, atol=1e-5, err_msg=str(shape))
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5,
                                                           err_msg=str(shape)), one[1], got[1])
      print("MESH_OK", shape)
    print("SHARDED_OK", one[0])
""")


def run_script(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  """``python -c script args`` with 8 simulated CPU devices (conftest's XLA flags kept)."""
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True,
                        text=True, timeout=timeout)


def assert_eight_devices_match_one(module: str, timeout: int = 600, meshes=((2, 4, 1),)) -> None:
  here = os.path.dirname(os.path.abspath(__file__))
  proc = run_script(SCRIPT % (here, module, tuple(meshes)), timeout=timeout)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  assert "SHARDED_OK" in proc.stdout
