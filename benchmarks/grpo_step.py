"""One full GRPO game step: sample, judge, reference, payoff, gradient, update, in one compiled
function, with its FLOP-floor efficiency.

  python -m benchmarks.grpo_step [--vocab_size 320 --d_model 256 --d_ff 688 --n_layers 4
                                  --n_heads 4 --n_kv_heads 2 --prompts 2 --group_size 8
                                  --prompt_len 16 --new_tokens 32 --steps 7] [--no_hugepages]

The step is ``gamejax.step.make_step`` of a game whose play samples ``group_size`` completions of
each of ``prompts`` random full-length prompts (temperature 1, exactly ``new_tokens`` each: no
stop id is in the vocabulary), whose judge is a jitted function of the completion, whose
reference is a frozen copy of the params, and whose payoff is ``grpo`` (beta 0.04, so the
reference's forward pass is needed). Prints one JSON line:

* ``seconds_per_step``: the median of ``--steps`` timed steps after compilation and two warm-ups;
* ``completion_tokens_per_s``: ``prompts * group_size * new_tokens`` / ``seconds_per_step``;
* ``efficiency``: the step's FLOP floor over the f32 matmul throughput measured in this process
  (``common.matmul_peak_flops``), divided by ``seconds_per_step``. The floor counts the sampling
  (``benchmarks.sample.decode_flops``: prefill and cached decode), the policy's forward and
  backward over the ``[B, prompt_len + new_tokens]`` record (``lm.flops_per_token``, 6x) and
  the reference's forward (a third of that);
* ``sample_seconds`` and ``sample_efficiency``: the sampler alone on the same shapes, so the
  rest of the step's time (``seconds_per_step - sample_seconds``) can be read off.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from benchmarks.sample import decode_flops
from gamejax import hostenv, sampling, sharding, step as game_step
from gamejax.models import lm
from gamejax.payoffs import grpo
from gamejax.players import judges, policy, reference

NEVER = -1     # a stop id the sampler cannot draw: every completion has new_tokens tokens


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  common.add_model_flags(p, "models/bench_sampling.gin")
  for name, value in (("prompts", 2), ("group_size", 8), ("prompt_len", 16), ("new_tokens", 32),
                      ("steps", 7)):
    p.add_argument(f"--{name}", type=int, default=value)
  args = common.parse_args(p, argv)
  cfg = common.model_config(args)
  g, n, length = args.group_size, args.new_tokens, args.prompt_len
  rows = args.prompts * g

  apply = functools.partial(lm.apply, cfg)
  half = cfg.vocab_size // 2
  judge = judges.function_judge(
      lambda moves, facts: (facts["completion"] < half).astype(jnp.float32).mean(axis=-1))
  game = game_step.Game(
      learners={"agent": game_step.Learner(apply, grpo(g, beta=0.04), optax.adamw(1e-5))},
      play=policy.sampled_play(cfg, g, n, temperature=1.0, eos_id=NEVER),
      respond=judges.responders(judge, reference.reference(apply)))
  params = lm.init_params(cfg, jax.random.PRNGKey(0))
  state = game_step.init_state(game, {"agent": params}, jax.random.PRNGKey(1),
                               frozen={"reference": jax.tree.map(jnp.copy, params)})
  mesh = sharding.make_mesh()
  step, shardings = game_step.make_step(game, mesh, jax.eval_shape(lambda: state))
  state = jax.device_put(state, shardings)
  rng = np.random.default_rng(0)
  batch = {"prompt": rng.integers(3, cfg.vocab_size, (1, args.prompts, length)).astype(np.int32),
           "prompt_lengths": np.full((1, args.prompts), length, np.int32)}
  batch = jax.device_put(batch, sharding.batch_sharding(mesh, leading=1))

  secs, state = common.median_step_seconds(step, state, batch, args.steps)
  generate = sampling.make_generate(cfg, n, temperature=1.0, eos_id=NEVER)
  prompts = jnp.repeat(batch["prompt"][0], g, axis=0)
  lengths = jnp.repeat(batch["prompt_lengths"][0], g, axis=0)
  sample_secs = statistics.median(common.time_calls(
      lambda: jax.block_until_ready(generate(state.params["agent"], prompts, lengths,
                                             jax.random.PRNGKey(2))),
      args.steps, warmup=2))
  peak = common.matmul_peak_flops()

  t = length + n
  sample_flops = decode_flops(cfg, rows, length, n)
  train_flops = lm.flops_per_token(cfg, t) * rows * t
  step_flops = sample_flops + train_flops + train_flops / 3
  print(json.dumps({
      "benchmark": "grpo_step", "device": jax.devices()[0].device_kind,
      "params": lm.param_count(cfg), "prompts": args.prompts, "group_size": g,
      "prompt_len": length, "new_tokens": n,
      "seconds_per_step": secs, "completion_tokens_per_s": rows * n / secs,
      "step_flops": step_flops, "matmul_peak_flops_per_s": peak,
      "efficiency": step_flops / peak / secs,
      "sample_seconds": sample_secs, "sample_efficiency": sample_flops / peak / sample_secs,
      "malloc_hugepages": hostenv.malloc_hugepages_enabled()}))


if __name__ == "__main__":
  main()
