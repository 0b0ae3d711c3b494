import os

# Simulated devices must be requested before JAX initialises; tests that need 8 run in a subprocess.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
