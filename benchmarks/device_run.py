"""The accelerator measurements in one short run, for the few minutes a GPU is lent.

  python -m benchmarks.device_run [--budget_s 480] [--smoke]

Runs, each as its own process with a share of the time budget (a case that fails or runs out of
time is reported and the next one runs):

* ``train_1b_bf16``: ``benchmarks.train_step --model=models/1b.gin --settings=bf16`` (the 1B
  Llama in bf16 compute on f32 master weights, batch 8 x 2048 tokens); its MFU is against the
  bf16 matmul peak measured in the same process;
* ``sample_b64``: ``benchmarks.sample`` at batch 64, prompt 256, 256 new tokens, on the 1B model
  (without the no-cache baseline, which would take minutes);
* ``grpo_64x8``: ``benchmarks.grpo_step`` at 64 prompts x 8 completions x 256 prompt tokens x
  256 new, on the 26M benchmark model (``models/bench.gin``; the 1B model's forward and backward
  over 512 x 512 tokens needs more memory than one GPU has without remat and accumulation);
* ``memory_1b_grpo``: ``benchmarks.memory``, the GPU compiler's memory analysis of the 1B GRPO
  step at that shape with remat, 8 microbatches, and the logits whole or read 32 positions at a
  time (``logits_chunk``): whether it fits one GPU, compiled and not run.

Prints each case's JSON line as it comes, then one summary line. ``--smoke`` runs the same cases
at toy sizes (a CPU check that the script itself works).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = {
    "train_1b_bf16": ("train_step", ["--model=models/1b.gin", "--settings=bf16", "--batch=8",
                                     "--seq_len=2048", "--steps=5"]),
    "sample_b64": ("sample", ["--model=models/1b.gin", "--batch=64", "--prompt_len=256",
                              "--new_tokens=256", "--calls=5", "--no_baseline"]),
    "grpo_64x8": ("grpo_step", ["--model=models/bench.gin", "--prompts=64", "--group_size=8",
                                "--prompt_len=256", "--new_tokens=256", "--steps=3"]),
    "memory_1b_grpo": ("memory", ["--model=models/1b.gin", "--prompts=64", "--group_size=8",
                                  "--prompt_len=256", "--new_tokens=256", "--accumulate=8",
                                  "--remat=full", "--logits_chunks=0,32"]),
}
SMOKE = ["--vocab_size=256", "--d_model=64", "--d_ff=128", "--n_layers=1", "--n_heads=4",
         "--n_kv_heads=2"]
SMOKE_SHAPES = {"memory": ["--prompts=2", "--group_size=2", "--prompt_len=8", "--new_tokens=8",
                           "--accumulate=1", "--logits_chunks=0,4"],
                "train_step": ["--batch=2", "--seq_len=32", "--steps=1"],
                "sample": ["--batch=4", "--prompt_len=8", "--new_tokens=8", "--calls=5"],
                "grpo_step": ["--prompts=2", "--group_size=2", "--prompt_len=8",
                              "--new_tokens=8", "--steps=2"]}


def case_args(module: str, args: list[str], smoke: bool) -> list[str]:
  """A case's arguments; at smoke sizes, its model file kept and every size made tiny."""
  if not smoke:
    return args
  kept = [a for a in args if a.startswith(("--model", "--settings", "--no_baseline", "--remat"))]
  return kept + SMOKE + SMOKE_SHAPES[module]


def run(module: str, args: list[str], timeout: float) -> dict:
  """One benchmark process: its JSON line, or what went wrong."""
  t = time.perf_counter()
  try:
    out = common.run_benchmark(module, args, REPO, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"ran past its {timeout:.0f} s share of the budget"}
  except common.BenchmarkFailed as e:
    return {"error": str(e)}
  return {**out, "wall_s": time.perf_counter() - t}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--budget_s", type=float, default=480.0, help="seconds for all cases together")
  p.add_argument("--smoke", action="store_true", help="toy sizes: check the script on a CPU")
  p.add_argument("--cases", default=",".join(CASES), help=f"some of {', '.join(CASES)}")
  args = p.parse_args(argv)
  cases = common.parse_cases(p, args.cases, CASES)
  start, results = time.perf_counter(), {}
  for i, name in enumerate(cases):
    left = args.budget_s - (time.perf_counter() - start)
    share = left / (len(cases) - i)
    module, case = CASES[name]
    results[name] = run(module, case_args(module, case, args.smoke), share)
    print(json.dumps({"case": name, **results[name]}), flush=True)
  print(json.dumps({"benchmark": "device_run", "smoke": args.smoke,
                    "failed": [n for n, r in results.items() if "error" in r],
                    "wall_s": time.perf_counter() - start}))
  return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
  sys.exit(main())
