"""``gamejax`` command line.

  gamejax train --gin_file=FILE [--gin_file=...] [--gin.KEY=VALUE ...] --workdir=DIR
                [--resume | --overwrite] [--no_progress]
  gamejax eval --workdir=DIR

Exit codes: 0 success; 2 bad input (config, workdir, data, checkpoint); 1 anything else.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Sequence

RUN_FILES = ("config.gin", "metrics.jsonl", "summary.json", "checkpoints")


class UsageError(ValueError):
  """Bad command-line input: a workdir in the way, a missing checkpoint, ..."""


def _split_gin_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Pulls ``--gin.KEY=VALUE`` (and ``--gin.KEY VALUE``) out of argv as gin bindings."""
  rest, bindings, i = [], [], 0
  argv = list(argv)
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--gin.") and arg != "--gin.":
      body = arg[len("--gin."):]
      if "=" not in body:
        if i + 1 >= len(argv):
          raise UsageError(f"{arg}: expected --gin.KEY=VALUE")
        body, i = f"{body}={argv[i + 1]}", i + 1
      bindings.append(body)
    else:
      rest.append(arg)
    i += 1
  return rest, bindings


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="gamejax", description="Train language models by playing games.")
  sub = p.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train", help="run an experiment from gin files")
  t.add_argument("--gin_file", action="append", default=[], required=True,
                 help="a gin experiment file (repeatable; later files override earlier ones)")
  t.add_argument("--workdir", required=True, help="run directory (config, metrics, checkpoints)")
  g = t.add_mutually_exclusive_group()
  g.add_argument("--resume", action="store_true", help="continue the run in --workdir")
  g.add_argument("--overwrite", action="store_true", help="delete the run in --workdir first")
  t.add_argument("--no_progress", action="store_true", help="no progress bar")
  e = sub.add_parser("eval", help="evaluate a run's latest checkpoint on the held-out split")
  e.add_argument("--workdir", required=True)
  e.add_argument("--stage", default=None, help="stage to evaluate (default: the last one trained)")
  return p


def _holds_run(workdir: str) -> bool:
  return os.path.isdir(workdir) and any(os.path.exists(os.path.join(workdir, f)) for f in RUN_FILES)


def _remove_run(workdir: str) -> None:
  """Deletes a run's files (and only those) from ``workdir``."""
  for name in RUN_FILES:
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)


def train(args, bindings) -> int:
  from gamejax import config, run
  config.parse(args.gin_file, bindings)
  exp = config.build_experiment(", ".join(args.gin_file))
  operative = config.operative_config()
  workdir = os.path.abspath(args.workdir)
  if _holds_run(workdir) and not (args.overwrite or args.resume):
    raise UsageError(f"{workdir} holds another run; pass --resume to continue it or "
                     "--overwrite to replace it")
  run.prepare_data(exp)                 # bad data fails here, before the workdir is touched
  if _holds_run(workdir):
    if args.overwrite:
      _remove_run(workdir)
    else:
      old = os.path.join(workdir, "config.gin")
      if os.path.exists(old) and open(old).read() != operative:
        raise UsageError(f"--resume: {old} differs from the config given now; resume with the same "
                         "gin files and bindings, or use --overwrite")
  elif args.resume:
    print(f"gamejax: {workdir} holds no run yet; starting one", file=sys.stderr)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.gin"), "w") as f:
    f.write(operative)
  run.run_experiment(exp, workdir, progress=not args.no_progress)
  return 0


def evaluate(args) -> int:
  from gamejax import config, run
  workdir = os.path.abspath(args.workdir)
  cfg_path = os.path.join(workdir, "config.gin")
  if not os.path.exists(cfg_path):
    raise UsageError(f"{workdir}: no config.gin here; is it a gamejax run directory?")
  config.parse([cfg_path], [])
  exp = config.build_experiment(cfg_path)
  if exp.evaluation is None:
    raise UsageError(f"{cfg_path}: the experiment has no Evaluation configured")
  names = [s.name for s in exp.stages]
  if args.stage is not None and args.stage not in names:
    raise UsageError(f"--stage={args.stage!r} is not a stage of this run; stages: {names}")
  candidates = [args.stage] if args.stage else list(reversed(names))
  for name in candidates:
    if os.path.isdir(os.path.join(workdir, "checkpoints", name)) and os.listdir(
        os.path.join(workdir, "checkpoints", name)):
      params = run.restore_params(exp, names.index(name), workdir)
      examples = run.load_eval_examples(exp)
      out = {name: run.evaluate_stage(exp, names.index(name), params, examples)}
      out.update(run.reference_accuracies(exp, examples))
      print(json.dumps(out, indent=2, sort_keys=True))
      return 0
  raise UsageError(f"{workdir}/checkpoints: no checkpoint of stage(s) {candidates}")


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    rest, bindings = _split_gin_flags(argv)
  except UsageError as e:
    print(f"gamejax: error: {e}", file=sys.stderr)
    return 2
  args = _parser().parse_args(rest)   # argparse exits 2 on its own errors
  from gamejax.checkpoint import CheckpointError
  from gamejax.config import ConfigError
  from gamejax.data.errors import DataError
  try:
    return train(args, bindings) if args.command == "train" else evaluate(args)
  except (ConfigError, UsageError, CheckpointError, DataError) as e:
    print(f"gamejax: error: {e}", file=sys.stderr)
    return 2


def entrypoint() -> None:
  """The ``gamejax`` console script: re-executes once with huge-page malloc (see hostenv)."""
  from gamejax import hostenv
  hostenv.reexec_with_malloc_hugepages()
  sys.exit(main())


if __name__ == "__main__":
  entrypoint()
