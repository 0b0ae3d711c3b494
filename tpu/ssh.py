#!/usr/bin/env python3
"""Runs a shell command on every worker (or one): e.g. to mount the shared storage of the runs.

  python tpu/ssh.py NAME --command=CMD [--worker=all|0|1|...] [--project=P] [--zone=Z] [--dry-run]

CMD is one shell command line, run by each worker's shell as written.
"""
from __future__ import annotations

import sys

import common


def configure(p) -> None:
  """Adds the command and the worker."""
  p.add_argument("--command", required=True, help="shell command line to run on the workers")
  p.add_argument("--worker", default="all", help="worker number, or all (default: all)")


def build(args) -> list[common.Command]:
  """One ssh."""
  return [common.ssh(args, args.command, worker=args.worker)]


if __name__ == "__main__":
  sys.exit(common.main(build, __doc__, configure))
