"""Runs a test module's compiled step on 1 and on 8 simulated CPU devices in a subprocess (the
device count must be set before JAX starts) and checks that losses and params agree.

The module provides ``run_on(mesh) -> (loss array, params)``; it may make its own checks (e.g.
that the 8-device params are really sharded).
"""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import importlib, sys
    sys.path.insert(0, %r)
    import jax, numpy as np
    from gamejax import sharding
    T = importlib.import_module(%r)
    assert len(jax.devices()) == 8, jax.devices()
    out = {name: T.run_on(mesh)
           for name, mesh in [("one", sharding.make_mesh(devices=jax.devices()[:1])),
                              ("eight", sharding.make_mesh(data=2, fsdp=4))]}
    np.testing.assert_allclose(out["one"][0], out["eight"][0], rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 out["one"][1], out["eight"][1])
    print("SHARDED_OK", out["one"][0])
""")


def assert_eight_devices_match_one(module: str, timeout: int = 600) -> None:
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")       # (conftest's flags kept)
  here = os.path.dirname(os.path.abspath(__file__))
  proc = subprocess.run([sys.executable, "-c", SCRIPT % (here, module)], env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  assert "SHARDED_OK" in proc.stdout
