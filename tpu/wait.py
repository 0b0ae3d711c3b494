#!/usr/bin/env python3
"""Waits until a queued resource is ACTIVE (its TPU VM or slice is up), polling its state.

  python tpu/wait.py NAME [--interval=SECONDS] [--timeout=SECONDS]
                     [--project=P] [--zone=Z] [--dry-run]

Exits 0 once ACTIVE, 1 if the request FAILED or was SUSPENDED (spot capacity reclaimed) or the
timeout passed.
"""
from __future__ import annotations

import subprocess
import sys
import time

import common

GIVE_UP = ("FAILED", "SUSPENDING", "SUSPENDED", "DELETING")


def configure(p) -> None:
  """Adds the polling flags."""
  p.add_argument("--interval", type=float, default=30.0, help="seconds between polls (default 30)")
  p.add_argument("--timeout", type=float, default=0.0,
                 help="give up after this many seconds (default 0: wait as long as it takes)")


def describe(args) -> common.Command:
  """The command that prints the queued resource's state (WAITING_FOR_RESOURCES, ACTIVE, ...)."""
  return common.gcloud(args, "queued-resources", "describe", args.name,
                       "--format=value(state.state)")


def build(args) -> list[common.Command]:
  """The one command each poll runs."""
  return [describe(args)]


def poll(args, commands) -> int:
  """Runs the describe command until the state is ACTIVE (0), a dead end or the timeout (1)."""
  start = time.monotonic()
  while True:
    done = subprocess.run(commands[0], capture_output=True, text=True)
    state = done.stdout.strip() if done.returncode == 0 else f"unknown ({done.stderr.strip()})"
    print(f"{args.name}: {state}", file=sys.stderr, flush=True)
    if state == "ACTIVE":
      return 0
    if state in GIVE_UP:
      print(f"error: queued resource {args.name} is {state}; delete it and create it again",
            file=sys.stderr)
      return 1
    if args.timeout and time.monotonic() - start + args.interval > args.timeout:
      print(f"error: {args.name} not ACTIVE after {args.timeout:g} s", file=sys.stderr)
      return 1
    time.sleep(args.interval)


if __name__ == "__main__":
  sys.exit(common.main(build, __doc__, configure, run=poll))
