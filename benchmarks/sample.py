"""Decode throughput of the KV-cached sampler against a no-cache decode, and its efficiency.

  python -m benchmarks.sample [--vocab_size 320 --d_model 256 --d_ff 688 --n_layers 4
                               --n_heads 4 --n_kv_heads 2 --batch 16 --prompt_len 16
                               --new_tokens 32 --calls 7] [--no_baseline]
                              [--top_k K --top_p P] [--no_hugepages]

Prints one JSON line. Both decoders sample at temperature 1 from ``batch`` full-length random
prompts and always produce exactly ``new_tokens`` tokens per row: ``eos_id=-1`` and no
``stop_ids``, an id the sampler can never draw (tokens are ``0..vocab_size-1``), so no row stops
early (checked). With no stop id in the vocabulary the sampler runs its fixed-length loop; an
in-vocabulary ``eos_id`` adds a per-step done check and an early-exit test (about 1% here). Each
timed call is one jitted call (prefill and all decode steps) that blocks on its result; the figures
are medians over ``--calls`` calls after compiling and two warm-up calls.

* ``tokens_per_s``: ``batch * new_tokens`` / seconds of ``sampling.make_generate`` (one prefill,
  then one cached step per token).
* ``baseline_tokens_per_s``: a no-cache decode, also jitted, a ``lax.fori_loop`` writing into a
  fixed ``[batch, prompt_len + new_tokens]`` buffer: each new token re-runs the full forward
  (``lm.apply``) on the whole buffer and samples from the logits at the last filled slot.
* ``speedup``: their ratio.
* ``efficiency``: ``decode_flops / peak / seconds``: the time the FLOP floor of the work would take
  at the matmul throughput of the model's compute dtype measured in this process
  (``common.matmul_peak_flops``), over the measured time. ``decode_flops`` (see ``decode_flops``
  below) is a decode-specific count, not ``lm.flops_per_token`` (which is training: 6x): each of
  the ``prompt_len + new_tokens - 1`` tokens fed to the model costs ``2 x`` its matmul weights in
  the blocks plus ``4 * n_layers * n_heads * head_dim`` per key it attends (its actual context:
  itself and the tokens before it, not the cache buffer's length), and the LM head (``2 * d_model *
  vocab_size``) is counted only for the ``new_tokens`` positions whose logits are sampled from.
  Prefill is in the timed call, so its FLOPs are in the count. Norms, RoPE, softmax and sampling
  are not counted. The peak is the higher of two measurements, before and after the timed calls.

``--top_k`` / ``--top_p`` (with ``--no_baseline``): the cached sampler draws from the filtered
distribution (``sampling.top_k_logits``, ``top_p_logits``), as ``gamejax generate`` and a rollout
with those options do.

``--cache_block`` (default 64): the decode loop in runs, each attending only the cache filled by
its end (``sampling.generate``; 0: one loop over the whole cache); ``decode_runs`` says how many.

``breakdown``: the fastest call's split into ``prefill`` (a one-token call timed on its own: the
prefill and one choice) and ``decode`` (the rest). ``decode_step_kernels``: the kernels XLA runs
per decode step (``decode_step_kernels``). ``best_seconds_per_call`` (the fastest cached call) is
printed too: on a machine shared with other
jobs the median can be far slower than the fastest call, and the fastest is the better guide to
what the code does on an idle machine.

Run as a script, it re-executes itself with glibc malloc on transparent huge pages, as
``benchmarks.train_step`` does (see ``gamejax.hostenv``).
"""
from __future__ import annotations

import argparse
import functools
import json
import re
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from gamejax import hostenv, sampling
from gamejax.models import lm


def decode_flops(cfg: lm.Config, batch: int, prompt_len: int, new_tokens: int) -> float:
  """The FLOP floor of prefilling ``prompt_len`` tokens and sampling ``new_tokens`` per row.

  >>> cfg = llama.LlamaConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
  ...                         d_ff=32)
  >>> # 2 fed tokens x 2 x 2304 block weights + 4 * 16 * (1 + 2) keys + 2 x 2 x 512 LM head
  >>> decode_flops(cfg, batch=1, prompt_len=1, new_tokens=2)
  11456.0
  """
  head = cfg.d_model * cfg.vocab_size
  block_params = lm.matmul_params(cfg) - head
  fed = prompt_len + new_tokens - 1
  contexts = fed * (fed + 1) / 2   # token at slot t attends t + 1 keys
  attention = 4.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * contexts
  return float(batch * (2.0 * block_params * fed + attention + 2.0 * head * new_tokens))


# HLO instructions that move no data (tuple plumbing, views, literals): not kernels.
PLUMBING = ("get-tuple-element", "tuple", "bitcast", "parameter", "constant")


def _computations(hlo_text: str) -> dict[str, list[str]]:
  """The instruction lines of each computation of a compiled module's HLO text."""
  out, name = {}, None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if head:
      name = head.group(1)
      out[name] = []
    elif name is not None and line.strip() and line.strip() != "}":
      out[name].append(line)
  return out


def decode_step_kernels(cfg: lm.Config, batch: int, prompt_len: int, new_tokens: int) -> int:
  """Kernels XLA runs per decode step of ``sampling.generate`` (temperature 1, fixed length):
  the instructions of the decode loop's body (the largest while body of the compiled sampler)
  that move data, i.e. everything but ``PLUMBING``."""
  params = jax.eval_shape(lambda: lm.init_params(cfg, jax.random.PRNGKey(0)))
  prompt = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32)
  lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
  fn = sampling.make_generate(cfg, new_tokens, temperature=1.0, eos_id=-1)
  text = fn.lower(params, prompt, lengths, jax.random.PRNGKey(0)).compile().as_text()
  computations = _computations(text)
  bodies = [computations[b] for b in re.findall(r"body=%?([\w.\-]+)", text)]
  opcode = lambda line: re.search(r"= (?:\S+|\(.*?\)) ([\w\-]+)\(", line)
  counts = [sum(1 for line in body if (m := opcode(line)) and m.group(1) not in PLUMBING)
            for body in bodies]
  return max(counts)


def make_uncached_generate(cfg: lm.Config, new_tokens: int, temperature: float):
  """The no-cache baseline: ``fn(params, prompt_BP, rng) -> tokens int32[B, N]`` for full-length
  prompts; every step runs ``lm.apply`` over the whole fixed ``[B, P + N]`` buffer."""

  @jax.jit
  def fn(params, prompt_BP, rng):
    b, p = prompt_BP.shape
    width = p + new_tokens
    buf_BW = jnp.zeros((b, width), jnp.int32).at[:, :p].set(prompt_BP)
    positions_BW = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (b, width))
    segments_BW = jnp.ones((b, width), jnp.int32)

    def body(i, buf_BW):
      logits_BWV = lm.apply(cfg, params, buf_BW, positions_BW, segments_BW)
      logits_BV = jax.lax.dynamic_index_in_dim(logits_BWV, p - 1 + i, axis=1, keepdims=False)
      token_B = jax.random.categorical(jax.random.fold_in(rng, i), logits_BV / temperature)
      return jax.lax.dynamic_update_slice(buf_BW, token_B.astype(jnp.int32)[:, None], (0, p + i))

    return jax.lax.fori_loop(0, new_tokens, body, buf_BW)[:, p:]

  return fn


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  common.add_model_flags(p, "models/bench_sampling.gin")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--prompt_len", type=int, default=16)
  p.add_argument("--new_tokens", type=int, default=32)
  p.add_argument("--calls", type=int, default=7, help="timed calls of each decoder (>= 5)")
  p.add_argument("--no_baseline", action="store_true",
                 help="skip the no-cache decode (on a large model it takes minutes)")
  p.add_argument("--top_k", type=int, default=0, help="sample among the k likeliest (0: off)")
  p.add_argument("--top_p", type=float, default=1.0, help="nucleus mass (1: off)")
  p.add_argument("--cache_block", type=int, default=sampling.DECODE_CACHE_BLOCK,
                 help="the decode loop's steps in runs of this many, each attending only the "
                      "cache filled by its end (0: one loop over the whole cache)")
  args = common.parse_args(p, argv)
  if args.calls < 5:
    p.error(f"--calls must be >= 5; got {args.calls}")
  if args.cache_block < 0:
    p.error(f"--cache_block must be >= 0; got {args.cache_block}")
  filtered = {"top_k": args.top_k, "top_p": args.top_p}
  if (args.top_k or args.top_p < 1.0) and not args.no_baseline:
    p.error("--top_k / --top_p time the cached sampler alone: add --no_baseline")
  cfg = common.model_config(args)
  temperature = 1.0

  params = lm.init_params(cfg, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  prompt_BP = rng.integers(3, cfg.vocab_size, (args.batch, args.prompt_len)).astype(np.int32)
  lengths_B = np.full((args.batch,), args.prompt_len, np.int32)
  prompt_BP, lengths_B = jax.device_put((prompt_BP, lengths_B))
  key = jax.random.PRNGKey(1)

  # eos_id=-1: never sampled, so every row runs to new_tokens (checked below).
  cached = sampling.make_generate(cfg, args.new_tokens, temperature=temperature, eos_id=-1,
                                  cache_block=args.cache_block, **filtered)
  uncached = make_uncached_generate(cfg, args.new_tokens, temperature)
  out = cached(params, prompt_BP, lengths_B, key)
  if not np.all(np.asarray(out["lengths"]) == args.new_tokens):
    raise RuntimeError(f"a row stopped early: lengths {np.asarray(out['lengths'])}")

  def timings(fn):
    return common.time_calls(lambda: jax.block_until_ready(fn()), args.calls, warmup=2)

  # The peak is measured before and after the timed calls and the higher one kept: on a shared
  # machine a busy moment would otherwise lower the peak and flatter the efficiency.
  peak = common.matmul_peak_flops(dtype=cfg.compute_dtype)
  cached_times = timings(functools.partial(cached, params, prompt_BP, lengths_B, key))
  prefill = sampling.make_generate(cfg, 1, temperature=temperature, eos_id=-1, **filtered)
  prefill_secs = common.best_seconds(
      lambda: jax.block_until_ready(prefill(params, prompt_BP, lengths_B, key)), args.calls)
  base_secs = (float("nan") if args.no_baseline else
               statistics.median(timings(functools.partial(uncached, params, prompt_BP, key))))
  peak = max(peak, common.matmul_peak_flops(dtype=cfg.compute_dtype))
  secs = statistics.median(cached_times)
  flops = decode_flops(cfg, args.batch, args.prompt_len, args.new_tokens)
  tokens = args.batch * args.new_tokens
  print(json.dumps({
      "benchmark": "sample", **common.device_info(),
      "config": {"vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_ff": cfg.d_ff,
                 "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                 "n_kv_heads": cfg.n_kv_heads},
      "params": lm.param_count(cfg), "batch": args.batch, "prompt_len": args.prompt_len,
      "new_tokens": args.new_tokens, "temperature": temperature, **filtered,
      "cache_block": args.cache_block,
      "decode_runs": len(sampling._runs(args.new_tokens, args.cache_block)),
      "seconds_per_call": secs, "best_seconds_per_call": min(cached_times),
      "tokens_per_s": tokens / secs,
      "baseline_seconds_per_call": base_secs, "baseline_tokens_per_s": tokens / base_secs,
      "speedup": base_secs / secs, "decode_flops": flops,
      "decode_step_kernels": decode_step_kernels(cfg, args.batch, args.prompt_len,
                                                 args.new_tokens),
      "matmul_peak_flops_per_s": peak, "efficiency": flops / peak / secs,
      "breakdown": {"prefill": prefill_secs, "decode": min(cached_times) - prefill_secs},
      "malloc_hugepages": hostenv.malloc_hugepages_enabled()}))


if __name__ == "__main__":
  main()
