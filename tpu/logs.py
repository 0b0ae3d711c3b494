#!/usr/bin/env python3
"""Shows the log of `gamejax train` on worker 0 (or on every worker), following it.

  python tpu/logs.py NAME [--worker=0|1|...|all] [--lines=N] [--no-follow] [--log=gamejax-train.log]
                     [--project=P] [--zone=Z] [--dry-run]

Stop following with Ctrl-C: the run goes on.
"""
from __future__ import annotations

import sys

import common


def configure(p) -> None:
  """Adds which worker, how much and whether to follow."""
  p.add_argument("--worker", default="0", help="worker number, or all (default: 0)")
  p.add_argument("--lines", type=int, default=100, help="last lines to show first (default 100)")
  p.add_argument("--no-follow", action="store_true", help="show the last lines and return")
  p.add_argument("--log", default=common.LOG, help=f"the log file (default: ~/{common.LOG})")


def build(args) -> list[common.Command]:
  """`tail` of the log on the chosen worker(s)."""
  follow = [] if args.no_follow else ["-F"]
  tail = " ".join(["tail", "-n", str(args.lines), *follow, common.remote_path(args.log)])
  return [common.ssh(args, tail, worker=args.worker)]


if __name__ == "__main__":
  sys.exit(common.main(build, __doc__, configure))
