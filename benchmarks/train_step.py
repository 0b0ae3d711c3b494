"""Training-step throughput and MFU of the compiled game step (pre-training payoff).

  python -m benchmarks.train_step [--d_model 512 --d_ff 1376 --n_layers 8 --n_heads 8
                                   --vocab_size 512 --seq_len 256 --batch 8 --steps 5]
                                  [--no_hugepages]

Prints one JSON line: tokens/s, model FLOPs/s, the f32 matmul peak measured in this process, and
MFU = model FLOPs/s / matmul peak. Model FLOPs per token: ``lm.flops_per_token`` (6 x matmul
params + causal attention), the standard accounting.

Run as a script, it first re-executes itself with glibc malloc on transparent huge pages (see
``gamejax.hostenv``; ``--no_hugepages`` to measure without), the setting a
training run on CPU should use too; ``malloc_hugepages`` in the JSON says which it measured. The
matmul peak is measured in the same process, under the same setting.
"""
from __future__ import annotations

import argparse
import functools
import json

import jax
import numpy as np
import optax

from benchmarks import common
from gamejax import hostenv, sharding, step as game_step
from gamejax.models import lm
from gamejax.payoffs import imitation


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  common.add_model_flags(p)
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=5, help="timed calls (one game step each)")
  args = common.parse_args(p, argv)
  cfg = common.model_config(args)

  learner = game_step.Learner(functools.partial(lm.apply, cfg),
                              imitation(("agent", "opponent")), optax.adamw(1e-4))
  game = game_step.Game(learners={"agent": learner})
  params = lm.init_params(cfg, jax.random.PRNGKey(0))
  state = game_step.init_state(game, {"agent": params}, jax.random.PRNGKey(1))
  mesh = sharding.make_mesh()
  fn, shardings = game_step.make_step(game, mesh, jax.eval_shape(lambda: state))
  state = jax.device_put(state, shardings)
  rng = np.random.default_rng(0)
  shape = (1, args.batch, args.seq_len)
  batch = dict(tokens=rng.integers(3, cfg.vocab_size, shape).astype(np.int32),
               positions=np.broadcast_to(np.arange(args.seq_len, dtype=np.int32), shape).copy(),
               segment_ids=np.ones(shape, np.int32),
               players=rng.integers(1, 3, shape).astype(np.int32))
  batch = jax.device_put(batch, sharding.batch_sharding(mesh, leading=1))

  secs, _ = common.median_step_seconds(fn, state, batch, args.steps)
  tokens = args.batch * args.seq_len
  flops = lm.flops_per_token(cfg, args.seq_len) * tokens / secs
  peak = common.matmul_peak_flops()
  print(json.dumps({
      "benchmark": "train_step", "device": jax.devices()[0].device_kind,
      "params": lm.param_count(cfg), "batch": args.batch, "seq_len": args.seq_len,
      "seconds_per_step": secs, "tokens_per_s": tokens / secs, "model_flops_per_s": flops,
      "matmul_peak_flops_per_s": peak, "mfu": flops / peak,
      "malloc_hugepages": hostenv.malloc_hugepages_enabled()}))


if __name__ == "__main__":
  main()
