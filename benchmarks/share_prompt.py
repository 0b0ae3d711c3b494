"""The GRPO game step with each group's prompt computed once in the training forwards
(``Rollout.share_prompt``) against the same step over every row, in one process.

  python -m benchmarks.share_prompt [--cases short,long,long_group] [--calls 15]
                                    [model flags, as benchmarks.grpo_step]

Each case is ``benchmarks.grpo_step``'s step (``compiled_step``) at one shape, compiled both ways;
after two warm-up calls each, the two steps alternate ``--calls`` times, so that a busy moment of
the machine falls on both alike. Prints one JSON line: per case the median seconds of each
(``full_seconds``, ``shared_seconds``), ``speedup`` (full over shared), the fastest calls'
ratio (``best_call_speedup``), and XLA's FLOP count of each compiled step (``full_flops``,
``shared_flops``: the training forwards' prompt rows fall by the group size).

The cases: ``short``, 2 prompts x 8 completions x 8 prompt tokens x 32 new, and ``short_b``,
4 x 4 x 8 x 64 (issue 12's GRPO shapes: prompts a sixth and a ninth of the record); ``long``,
2 x 8 x 32 x 32 (prompt and completion alike, as in RL on instructions); ``long_group``, 1 x 16 x
48 x 16 (a long prompt, short answers, a large group).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax

from benchmarks import common
from benchmarks.grpo_step import compiled_step
from gamejax.models import lm

# name -> (prompts, group_size, prompt_len, new_tokens)
CASES = {"short": (2, 8, 8, 32), "short_b": (4, 4, 8, 64), "long": (2, 8, 32, 32),
         "long_group": (1, 16, 48, 16)}


def step_flops(step, state, batch) -> float:
  """XLA's FLOP count of the compiled step."""
  cost = step.lower(state, batch).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def compare(cfg, shape: tuple[int, int, int, int], calls: int) -> dict:
  """One case: both steps compiled, warmed up, then timed alternately."""
  runs = {}
  for share in (False, True):
    step, state, batch = compiled_step(cfg, *shape, share_prompt=share)
    flops = step_flops(step, state, batch)
    for _ in range(2):
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
    runs[share] = {"step": step, "state": state, "batch": batch, "flops": flops, "times": []}
  for _ in range(calls):
    for run in runs.values():
      t = time.perf_counter()
      run["state"], metrics = run["step"](run["state"], run["batch"])
      jax.block_until_ready(metrics)
      run["times"].append(time.perf_counter() - t)
  full, shared = runs[False], runs[True]
  median = lambda r: statistics.median(r["times"])
  return {"prompts": shape[0], "group_size": shape[1], "prompt_len": shape[2],
          "new_tokens": shape[3], "full_seconds": median(full), "shared_seconds": median(shared),
          "speedup": median(full) / median(shared),
          "best_call_speedup": min(full["times"]) / min(shared["times"]),
          "full_flops": full["flops"], "shared_flops": shared["flops"]}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_model_flags(p, "models/bench_sampling.gin")
  p.add_argument("--cases", default=",".join(CASES), help=f"some of {', '.join(CASES)}")
  p.add_argument("--calls", type=int, default=15)
  args = common.parse_args(p, argv)
  cases = common.parse_cases(p, args.cases, CASES)
  if args.calls < 1:
    p.error(f"--calls must be >= 1; got {args.calls}")
  cfg = common.model_config(args)
  print(json.dumps({"benchmark": "share_prompt", **common.device_info(),
                    "params": lm.param_count(cfg),
                    "cases": {c: compare(cfg, CASES[c], args.calls) for c in cases}}))


if __name__ == "__main__":
  main()
