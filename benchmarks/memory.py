"""The memory a compiled GRPO game step needs, from XLA's own analysis of the compiled program:
no step runs, so a 1B model at a realistic shape is measured on any host.

  python -m benchmarks.memory [--model models/1b.gin --prompts 64 --group_size 8
                               --prompt_len 256 --new_tokens 256 --accumulate 8
                               --remat full --logits_chunks 0,32]

The step is ``benchmarks.grpo_step``'s (sample, judge, reference, payoff, AdamW update) with
``--accumulate`` microbatches of whole groups and the blocks rematerialised as ``--remat`` says,
compiled once for each ``LlamaConfig.logits_chunk`` in ``--logits_chunks`` (0: the payoffs hold
the ``[B, T, V]`` logits; C > 0: the LM head and its log-softmax ``C`` positions at a time,
``gamejax.models.logprobs``). Params and state are abstract (``jax.eval_shape``): nothing is
allocated. Prints one JSON line: per chunk setting, XLA's ``memory_analysis`` of the compiled
step (arguments, outputs, temporaries, and their sum less the donated state, the peak the step
needs on one device), and the logits' own size (``B x T x V`` float32) for scale.

On a GPU or TPU this is the figure to trust (the compiler that runs the step analyses it). On the
CPU it is an upper bound: XLA:CPU drops remat's optimization barriers, so every block's
activations count as live. The 1B model at the default shapes on the 2-core AMD EPYC host: 264 GB
with the logits whole, 223 GB in blocks of 32 (``logits_gb``: 134 GB), compiled in 33 s.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from benchmarks import common, grpo_step

GB = 1e9


def step_memory(cfg, prompts: int, group_size: int, prompt_len: int, new_tokens: int,
                accumulate: int) -> dict:
  """XLA's memory analysis of the compiled GRPO step (bytes)."""
  step, state, batch = grpo_step.compiled_step(cfg, prompts, group_size, prompt_len, new_tokens,
                                               accumulate=accumulate, abstract=True)
  m = step.lower(state, batch).compile().memory_analysis()
  args, out, temp = m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes
  alias = getattr(m, "alias_size_in_bytes", 0)
  return {"arguments": args, "outputs": out, "temporaries": temp, "aliased": alias,
          "peak": args + out + temp - alias}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  common.add_model_flags(p, "models/1b.gin")
  for name, value in (("prompts", 64), ("group_size", 8), ("prompt_len", 256),
                      ("new_tokens", 256), ("accumulate", 8)):
    p.add_argument(f"--{name}", type=int, default=value)
  p.add_argument("--remat", default="full", help="LlamaConfig.remat of the step")
  p.add_argument("--logits_chunks", default="0,32",
                 help="comma-separated LlamaConfig.logits_chunk values, each compiled")
  args = common.parse_args(p, argv)
  base = dataclasses.replace(common.model_config(args), remat=args.remat)
  rows, t = args.prompts * args.group_size, args.prompt_len + args.new_tokens
  cases = {}
  for chunk in (int(c) for c in args.logits_chunks.split(",") if c):
    cfg = dataclasses.replace(base, logits_chunk=chunk)
    cases[str(chunk)] = {k: v / GB for k, v in step_memory(
        cfg, args.prompts, args.group_size, args.prompt_len, args.new_tokens,
        args.accumulate).items()}
  print(json.dumps({
      "benchmark": "memory", **common.device_info(), "unit": "GB",
      "params": common.lm.param_count(base), "vocab_size": base.vocab_size,
      "prompts": args.prompts, "group_size": args.group_size, "prompt_len": args.prompt_len,
      "new_tokens": args.new_tokens, "accumulate": args.accumulate, "remat": args.remat,
      "dtype": base.dtype, "logits_gb": rows * t * base.vocab_size * 4 / GB,
      "logits_chunk": cases}))


if __name__ == "__main__":
  main()
