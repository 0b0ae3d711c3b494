"""One full GRPO game step: sample, judge, reference, payoff, gradient, update, in one compiled
function, with its FLOP-floor efficiency.

  python -m benchmarks.grpo_step [--vocab_size 320 --d_model 256 --d_ff 688 --n_layers 4
                                  --n_heads 4 --n_kv_heads 2 --prompts 2 --group_size 8
                                  --prompt_len 16 --new_tokens 32 --steps 7] [--logits_chunk C]
                                 [--share_prompt] [--no_hugepages]

The step is ``gamejax.step.make_step`` of a game whose play samples ``group_size`` completions of
each of ``prompts`` random full-length prompts (temperature 1, exactly ``new_tokens`` each: no
stop id is in the vocabulary), whose judge is a jitted function of the completion, whose
reference is a frozen copy of the params, and whose payoff is ``grpo`` (beta 0.04, so the
reference's forward pass is needed). Prints one JSON line:

* ``seconds_per_step``: the median of ``--steps`` timed steps after compilation and two warm-ups;
* ``completion_tokens_per_s``: ``prompts * group_size * new_tokens`` / ``seconds_per_step``;
* ``efficiency``: the step's FLOP floor over the matmul throughput of the model's compute dtype
  measured in this process (``common.matmul_peak_flops``), divided by ``seconds_per_step``. The
  floor counts the sampling (``benchmarks.sample.decode_flops``: one prefill per prompt and cached
  decode), the policy's forward and backward over the ``[B, prompt_len + new_tokens]`` record
  (``lm.flops_per_token``, 6x) and the reference's forward (a third of that);
* ``sample_seconds`` and ``sample_efficiency``: the sampler alone on the same shapes (a group's
  completions sharing their prompt's prefill, as in the step), so the rest of the step's time
  (``seconds_per_step - sample_seconds``) can be read off;
* ``breakdown``: seconds of the step's parts, each timed on its own (``breakdown`` below):
  ``sample_prefill``, ``sample_decode``, ``reference_forward``, ``policy_forward_backward``,
  ``optimizer``, and ``host_and_rest`` (the step less those);
* ``--share_prompt``: the policy's and the reference's forwards compute each group's prompt once
  (``sampled_play(share_prompt=True)``; the breakdown's forwards too), and the FLOP floor still
  counts every row's (the same work done, fewer FLOPs spent on it);
* ``--logits_chunk C``: the payoff's and the reference's log-probs read ``C`` positions at a
  time (``gamejax.models.logprobs``), from the record's first move (the prompts' LM head not run;
  the FLOP floor still counts it);
* ``prefill_flops`` / ``prefill_flops_unshared``: the prefill's FLOP floor with one prefill per
  prompt and with one per completion (G x more), and ``prefill_flops_xla``: XLA's own count of
  the compiled prefill both ways.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from benchmarks.sample import decode_flops
from gamejax import hostenv, records, sampling, sharding, step as game_step
from gamejax.models import lm
from gamejax.payoffs import base, grpo
from gamejax.players import judges, policy, reference

NEVER = -1     # a stop id the sampler cannot draw: every completion has new_tokens tokens


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  common.add_model_flags(p, "models/bench_sampling.gin")
  for name, value in (("prompts", 2), ("group_size", 8), ("prompt_len", 16), ("new_tokens", 32),
                      ("steps", 7)):
    p.add_argument(f"--{name}", type=int, default=value)
  p.add_argument("--share_prompt", action="store_true",
                 help="the policy's and the reference's forwards compute each group's prompt once")
  p.add_argument("--logits_chunk", type=int, default=None,
                 help="LlamaConfig.logits_chunk (default: --model's): the payoff's and the "
                      "reference's log-probs read this many positions at a time, from the "
                      "record's first move")
  args = common.parse_args(p, argv)
  cfg = common.model_config(args)
  if args.logits_chunk is not None:
    cfg = dataclasses.replace(cfg, logits_chunk=args.logits_chunk)
  g, n, length = args.group_size, args.new_tokens, args.prompt_len
  rows = args.prompts * g
  step, state, batch = compiled_step(cfg, args.prompts, g, length, n, args.share_prompt)

  secs, state = common.median_step_seconds(step, state, batch, args.steps)
  parts = breakdown(cfg, state.params["agent"], batch["prompt"][0], batch["prompt_lengths"][0],
                    g, n, args.steps, args.share_prompt)
  peak = common.matmul_peak_flops(dtype=cfg.compute_dtype)

  t = length + n
  sample_flops = decode_flops(cfg, rows, length, n) - prefill_flops(cfg, rows - args.prompts,
                                                                    length)
  train_flops = lm.flops_per_token(cfg, t) * rows * t
  step_flops = sample_flops + train_flops + train_flops / 3
  sample_secs = parts["sample_prefill"] + parts["sample_decode"]
  print(json.dumps({
      "benchmark": "grpo_step", **common.device_info(),
      "params": lm.param_count(cfg), "prompts": args.prompts, "group_size": g,
      "prompt_len": length, "new_tokens": n,
      "seconds_per_step": secs, "completion_tokens_per_s": rows * n / secs,
      "step_flops": step_flops, "matmul_peak_flops_per_s": peak,
      "efficiency": step_flops / peak / secs,
      "sample_seconds": sample_secs, "sample_efficiency": sample_flops / peak / sample_secs,
      "prefill_flops": prefill_flops(cfg, args.prompts, length),
      "prefill_flops_unshared": prefill_flops(cfg, rows, length),
      "prefill_flops_xla": parts.pop("prefill_flops_xla"), "share_prompt": args.share_prompt,
      "breakdown": {**parts, "host_and_rest": secs - sum(parts.values())},
      "malloc_hugepages": hostenv.malloc_hugepages_enabled()}))


def compiled_step(cfg: lm.Config, prompts: int, group_size: int, prompt_len: int,
                  new_tokens: int, share_prompt: bool = False, accumulate: int = 1,
                  abstract: bool = False):
  """``(step, state, batch)``: the benchmark's GRPO game (the module docstring) as
  ``game_step.make_step`` compiles it, its state on the mesh, and a batch of ``prompts`` random
  full-length prompts. ``share_prompt``: the forwards compute each group's prompt once;
  ``accumulate``: the gradient in that many microbatches (of whole groups when they divide);
  ``abstract``: the state and batch as shapes only (``jax.eval_shape``; nothing allocated), for
  ``step.lower(state, batch)``."""
  apply = lm.bind(cfg)          # with cfg.logits_chunk, the payoffs read the logits in blocks
  half = cfg.vocab_size // 2
  judge = judges.function_judge(
      lambda moves, facts: (facts["completion"] < half).astype(jnp.float32).mean(axis=-1))
  game = game_step.Game(
      learners={"agent": game_step.Learner(apply, grpo(group_size, beta=0.04),
                                           optax.adamw(1e-5), accumulate=accumulate)},
      play=policy.sampled_play(cfg, group_size, new_tokens, temperature=1.0, eos_id=NEVER,
                               share_prompt=share_prompt),
      respond=judges.responders(judge, reference.reference(apply)))

  def init():
    params = lm.init_params(cfg, jax.random.PRNGKey(0))
    return game_step.init_state(game, {"agent": params}, jax.random.PRNGKey(1),
                                frozen={"reference": jax.tree.map(jnp.copy, params)})

  mesh = sharding.make_mesh()
  shapes = jax.eval_shape(init)
  step, shardings = game_step.make_step(game, mesh, shapes)
  rng = np.random.default_rng(0)
  batch = {"prompt": rng.integers(3, cfg.vocab_size, (1, prompts, prompt_len)).astype(np.int32),
           "prompt_lengths": np.full((1, prompts), prompt_len, np.int32)}
  if abstract:
    return step, shapes, jax.eval_shape(lambda: batch)
  state = jax.device_put(init(), shardings)
  return step, state, jax.device_put(batch, sharding.batch_sharding(mesh, leading=1))


def prefill_flops(cfg: lm.Config, prompts: int, prompt_len: int) -> float:
  """The FLOP floor of prefilling ``prompts`` distinct prompts (``decode_flops`` of the prompt
  alone, less the one LM head it counts): a group's completions share their prompt's."""
  return decode_flops(cfg, prompts, prompt_len, 1) - 2.0 * cfg.d_model * cfg.vocab_size * prompts


def breakdown(cfg: lm.Config, params, prompt_UP, lengths_U, group_size: int, new_tokens: int,
              calls: int, share_prompt: bool = False) -> dict:
  """Seconds of the step's parts, each compiled and timed on its own on the step's shapes (the
  fastest of ``calls``): the sampler's prefill (a one-token ``generate``: prefill, broadcast to
  the group, one choice) and its decode (the rest of a full ``generate``), the reference's
  log-probs (its forward), the policy's log-probs of the sampled moves and their gradient (its
  forward and backward; both read as the step's payoff and reference do: in blocks with
  ``logits_chunk``, from the record's first move), and the optimizer's update. The fused step
  overlaps and shares work, so ``seconds_per_step`` minus their sum (``host_and_rest``: the
  judge, the payoff, the host's dispatch) can be negative. Also XLA's FLOPs of the prefill
  with the group sharing it and with G copies of each prompt (``prefill_flops_xla``).
  ``share_prompt``: the forwards compute each group's prompt once, as the step's do then."""
  key = jax.random.PRNGKey(2)

  def sampler(tokens, group):
    return jax.jit(lambda p, prompt, lengths: sampling.generate(
        cfg, p, prompt, lengths, tokens, key, 1.0, NEVER, group_size=group))

  def xla_flops(fn, *args):
    cost = fn.lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])

  one, full = sampler(1, group_size), sampler(new_tokens, group_size)
  copies = (jnp.repeat(prompt_UP, group_size, axis=0), jnp.repeat(lengths_U, group_size))
  time_it = lambda fn, *a: common.best_seconds(lambda: jax.block_until_ready(fn(*a)), calls)
  prefill = time_it(one, params, prompt_UP, lengths_U)
  sampled = full(params, prompt_UP, lengths_U)
  tokens_BT = jnp.concatenate([copies[0], sampled["tokens"]], axis=1)
  positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1], dtype=jnp.int32), tokens_BT.shape)
  ones_BT = jnp.ones_like(tokens_BT)
  shared = records.SharedPrompt(copies[1], group_size=group_size,
                                width=prompt_UP.shape[1]) if share_prompt else None
  # The step's record (the prompts its opening, as sampled_play's) and its readers: the
  # reference's log-probs and the policy's of the sampled moves (in blocks with logits_chunk).
  record = lambda t: records.GameRecord(t, positions_BT, ones_BT, ones_BT, shared_prompt=shared,
                                        opening=prompt_UP.shape[1])
  apply = lm.bind(cfg)
  forward = jax.jit(lambda p, t: reference.token_logprobs(apply, p, record(t),
                                                          reference.ALL_PLAYERS))

  def log_likelihood(p, t):
    return base.token_logprobs(apply, p, record(t), sampled_only=True).logprobs.mean()

  backward = jax.jit(jax.grad(log_likelihood))
  grads = backward(params, tokens_BT)
  opt = optax.adamw(1e-5)
  update = jax.jit(lambda g_, s, p: optax.apply_updates(p, opt.update(g_, s, p)[0]))
  return {"sample_prefill": prefill,
          "sample_decode": time_it(full, params, prompt_UP, lengths_U) - prefill,
          "reference_forward": time_it(forward, params, tokens_BT),
          "policy_forward_backward": time_it(backward, params, tokens_BT),
          "optimizer": time_it(update, grads, opt.init(params), params),
          "prefill_flops_xla": {
              "shared": xla_flops(one, params, prompt_UP, lengths_U),
              "unshared": xla_flops(sampler(1, 1), params, *copies)}}


if __name__ == "__main__":
  main()
