#!/usr/bin/env python3
"""Copies a folder (a run directory) from a worker of the TPU VM to this machine.

  python tpu/fetch.py NAME REMOTE_DIR LOCAL_DIR [--worker=0] [--project=P] [--zone=Z] [--dry-run]

For a run directory on the worker's own disk, before `tpu/delete.py` deletes it.
"""
from __future__ import annotations

import sys

import common


def configure(p) -> None:
  """Adds the source and destination folders and the worker."""
  p.add_argument("remote", metavar="REMOTE_DIR", help="folder on the worker")
  p.add_argument("local", metavar="LOCAL_DIR", help="where to put it here")
  p.add_argument("--worker", default="0", help="worker number (default: 0)")


def build(args) -> list[common.Command]:
  """One recursive scp from the worker."""
  return [common.gcloud(args, "tpu-vm", "scp", "--recurse", f"{args.name}:{args.remote}",
                        args.local, f"--worker={args.worker}")]


if __name__ == "__main__":
  sys.exit(common.main(build, __doc__, configure))
