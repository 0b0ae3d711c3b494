"""This tree's benchmarks against an earlier commit's, in one run on this machine.

  python -m benchmarks.against_commit [--commit 93197d3] [--rounds 3] [--cases grpo_a,sample]

The earlier commit is unpacked from this repository (``git archive``) into a temporary folder,
and each case runs there and here as ``python -m benchmarks.<name> <args>`` (same interpreter,
same packages; the unpacked tree's ``gamejax`` is the one imported there, checked). The two
alternate, ``--rounds`` times, so that a busy moment of the machine falls on both alike; a case's
time on each side is the best of its rounds (each round already reports a median of several
calls). Prints one JSON line: per case the commit's and this tree's seconds and ``speedup`` (the
commit's seconds over this tree's; above 1 is faster here), and the ``target`` speedup the case
is held to (``meets_target``). Where both trees' benchmark also prints its fastest call
(``sample``'s ``best_seconds_per_call``), ``best_call_speedup`` is the ratio of the fastest calls
over all rounds (``meets_target_best_call``): on a machine shared with other jobs a median can
fall on a busy moment, the fastest call rarely does. A GRPO case also reports
``speedup_if_sampling_at_floor`` (``sampling_bound``): the speedup this tree's step would have
with its training half as measured and sampling at its FLOP floor, the most any sampler could
give on this machine.

The cases are the shapes issue 12 sets: a GRPO step of 2 prompts x 8 completions x 8 prompt
tokens x 32 new and of 4 x 4 x 8 x 64 (target 1.25x), and the sampler at batch 16, prompt 16,
64 new (target 1.4x), all on the benchmarks' default model (``experiments/models/
bench_sampling.gin``). ``grpo_a_shared`` and ``grpo_b_shared`` (run only when named) are the GRPO
shapes with this tree's step computing each group's prompt once (``--share_prompt``, an option the
commit does not have: ``here_only_args``). ``sample_vocab32k`` and ``sample_vocab128k_b64`` (also
run only when named, against a commit from 26e4f3d on) are the sampler at real vocabularies;
``sample_n256`` and ``grpo_n128`` (also only when named, no target) the sampler and the GRPO step
on long answers (256 and 128 new tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from benchmarks import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = "93197d3"

# name -> (benchmark module, its arguments, the JSON field of seconds (a median), the field of the
# fastest call where both trees print one, target speedup)
CASES = {
    "grpo_a": ("grpo_step", ["--prompts=2", "--group_size=8", "--prompt_len=8",
                             "--new_tokens=32"], "seconds_per_step", None, 1.25),
    "grpo_b": ("grpo_step", ["--prompts=4", "--group_size=4", "--prompt_len=8",
                             "--new_tokens=64"], "seconds_per_step", None, 1.25),
    "sample": ("sample", ["--batch=16", "--prompt_len=16", "--new_tokens=64"],
               "seconds_per_call", "best_seconds_per_call", 1.4),
}
# Cases run only when named (``--cases``): this tree's step with an option the commit lacks, given
# to this tree alone (``HERE_ONLY``), against the commit's step at the same shape; and, with no
# target, the sampler at real vocabularies (32,000 words at batch 16, 128,256 at batch 64), cached
# decode only (``--no_baseline``, which a commit from 26e4f3d on has).
_REAL_VOCAB = ["--prompt_len=16", "--new_tokens=64", "--no_baseline", "--calls=5"]
EXTRA_CASES = {
    "grpo_a_shared": CASES["grpo_a"],
    "grpo_b_shared": CASES["grpo_b"],
    "sample_vocab32k": ("sample", ["--batch=16", "--vocab_size=32000", *_REAL_VOCAB],
                        "seconds_per_call", "best_seconds_per_call", None),
    "sample_vocab128k_b64": ("sample", ["--batch=64", "--vocab_size=128256", *_REAL_VOCAB],
                             "seconds_per_call", "best_seconds_per_call", None),
    # Long answers (no target): the sampler at 256 new tokens, the GRPO step at 128.
    "sample_n256": ("sample", ["--batch=16", "--prompt_len=16", "--new_tokens=256",
                               "--no_baseline", "--calls=5"],
                    "seconds_per_call", "best_seconds_per_call", None),
    "grpo_n128": ("grpo_step", ["--prompts=2", "--group_size=8", "--prompt_len=16",
                                "--new_tokens=128"], "seconds_per_step", None, None),
}
HERE_ONLY = {"grpo_a_shared": ["--share_prompt"], "grpo_b_shared": ["--share_prompt"]}
DEFAULT_CASES = tuple(CASES)
CASES = {**CASES, **EXTRA_CASES}


class CommitError(RuntimeError):
  """The earlier commit cannot be unpacked or its benchmark did not run."""


def unpack(commit: str, into: str) -> str:
  """``commit``'s files (``git archive``) under ``into``; returns the full commit id."""
  def git(*args, **kw):
    return subprocess.run(["git", "-C", REPO, *args], check=True, capture_output=True, **kw)
  try:
    full = git("rev-parse", "--verify", f"{commit}^{{commit}}", text=True).stdout.strip()
    archive = git("archive", "--format=tar", full).stdout
  except (subprocess.CalledProcessError, FileNotFoundError) as e:
    raise CommitError(f"cannot unpack commit {commit!r} of {REPO}: "
                      f"{getattr(e, 'stderr', b'') or e}") from None
  subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
  return full


def _imported_from(tree: str) -> str:
  out = subprocess.run([sys.executable, "-c", "import gamejax, os; print(os.path.dirname("
                        "os.path.dirname(os.path.abspath(gamejax.__file__))))"],
                       cwd=tree, capture_output=True, text=True, check=True)
  return out.stdout.strip()


def run_case(tree: str, module: str, args: list[str]) -> dict:
  """One run of ``benchmarks.<module>`` in ``tree``: its JSON line."""
  try:
    return common.run_benchmark(module, args, tree, dict(os.environ, PYTHONPATH=tree))
  except common.BenchmarkFailed as e:
    raise CommitError(f"in {tree}: {e}") from None


def sampling_bound(commit_seconds: float, here: dict) -> float | None:
  """The commit's seconds over this tree's step as it would be with sampling at its FLOP floor
  (every decode GEMM at the matmul peak, nothing else in the loop) and no host overhead: the
  training half as measured (``grpo_step``'s breakdown: the reference's forward, the policy's
  forward and backward, the optimizer) plus the sampler's floor (``sample_efficiency`` x
  ``sample_seconds``). None for a benchmark without that breakdown.

  >>> sampling_bound(0.3, {"breakdown": {"reference_forward": 0.04, "policy_forward_backward":
  ...     0.15, "optimizer": 0.01}, "sample_seconds": 0.1, "sample_efficiency": 0.5})
  1.2
  """
  parts = here.get("breakdown") or {}
  if "policy_forward_backward" not in parts or "sample_efficiency" not in here:
    return None
  training = parts["reference_forward"] + parts["policy_forward_backward"] + parts["optimizer"]
  return commit_seconds / (training + here["sample_efficiency"] * here["sample_seconds"])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--commit", default=BASELINE)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--cases", default=",".join(DEFAULT_CASES),
                 help=f"some of {', '.join(CASES)} (default {', '.join(DEFAULT_CASES)})")
  args = p.parse_args(argv)
  cases = common.parse_cases(p, args.cases, CASES)
  if args.rounds < 1:
    p.error(f"--rounds must be >= 1; got {args.rounds}")
  with tempfile.TemporaryDirectory(prefix="gamejax-commit-") as old:
    try:
      full = unpack(args.commit, old)
    except CommitError as e:
      print(f"against_commit: {e}", file=sys.stderr)
      return 2
    for tree in (old, REPO):
      source = _imported_from(tree)
      if os.path.realpath(source) != os.path.realpath(tree):
        print(f"against_commit: gamejax in {tree} imports from {source}", file=sys.stderr)
        return 2
    seconds = {c: {"commit": [], "here": []} for c in cases}
    best = {c: {"commit": [], "here": []} for c in cases}
    last = {}
    for _ in range(args.rounds):
      for case in cases:
        module, case_args, field, best_field, _ = CASES[case]
        for side, tree in (("commit", old), ("here", REPO)):
          extra = HERE_ONLY.get(case, []) if side == "here" else []
          out = run_case(tree, module, case_args + extra)
          seconds[case][side].append(out[field])
          if best_field:
            best[case][side].append(out[best_field])
          last[case, side] = out
  report = {"benchmark": "against_commit", "commit": full, "rounds": args.rounds,
            "device": last[cases[0], "here"].get("device"),
            "host_cpu": last[cases[0], "here"].get("host_cpu"), "cases": {}}
  for case in cases:
    module, case_args, field, best_field, target = CASES[case]
    before, after = min(seconds[case]["commit"]), min(seconds[case]["here"])
    report["cases"][case] = {
        "benchmark": module, "args": case_args, "here_only_args": HERE_ONLY.get(case, []),
        "field": field,
        "commit_seconds": before, "here_seconds": after, "speedup": before / after,
        "target": target, "meets_target": None if target is None else before / after >= target,
        "commit_rounds": seconds[case]["commit"], "here_rounds": seconds[case]["here"],
        "here_breakdown": last[case, "here"].get("breakdown")}
    bound = sampling_bound(before, last[case, "here"])
    if bound is not None:
      report["cases"][case]["speedup_if_sampling_at_floor"] = bound
    if best_field:
      fastest = {side: min(best[case][side]) for side in ("commit", "here")}
      speedup = fastest["commit"] / fastest["here"]
      report["cases"][case].update(
          best_field=best_field, commit_best_call=fastest["commit"],
          here_best_call=fastest["here"], best_call_speedup=speedup,
          meets_target_best_call=None if target is None else speedup >= target)
  print(json.dumps(report))
  return 0


if __name__ == "__main__":
  sys.exit(main())
