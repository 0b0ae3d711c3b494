#!/usr/bin/env python3
"""Stops `gamejax train` on every worker: SIGTERM, then waits while it saves a checkpoint.

  python tpu/stop.py NAME [--timeout=SECONDS] [--project=P] [--zone=Z] [--dry-run]

gamejax saves a checkpoint on SIGTERM and exits 0; `tpu/launch.py ... --resume` continues the run.
Exits nonzero if a worker's process outlives --timeout.
"""
from __future__ import annotations

import sys

import common


def configure(p) -> None:
  """Adds how long to wait for the checkpoint."""
  p.add_argument("--timeout", type=int, default=600,
                 help="seconds to wait for each worker's process to exit (default 600)")


def remote_stop(args) -> str:
  """The shell command each worker runs: SIGTERM to the launched process, wait for it to exit."""
  pidfile = common.remote_path(common.PIDFILE)
  host = "$(hostname)"
  return "; ".join([
      common.ALIVE,
      f'if [ ! -f {pidfile} ]; then echo "{host}: no gamejax train launched here"; exit 0; fi',
      f"pid=$(cat {pidfile})",
      f'if ! alive "$pid" || ! kill -TERM "$pid" 2>/dev/null; then '
      f'echo "{host}: gamejax train (pid $pid) is not running"; exit 0; fi',
      f'echo "{host}: sent SIGTERM to gamejax train (pid $pid); waiting for its checkpoint"',
      "ticks=0",
      f'while alive "$pid"; do if [ "$ticks" -ge {2 * int(args.timeout)} ]; then '
      f'echo "{host}: still running after {int(args.timeout)} s" >&2; exit 1; fi; '
      "sleep 0.5; ticks=$((ticks + 1)); done",
      f'echo "{host}: stopped"'])


def build(args) -> list[common.Command]:
  """One ssh to all workers."""
  return [common.ssh(args, remote_stop(args))]


if __name__ == "__main__":
  sys.exit(common.main(build, __doc__, configure))
