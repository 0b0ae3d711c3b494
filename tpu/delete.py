#!/usr/bin/env python3
"""Deletes a queued resource and its TPU VM or slice (everything on the workers' disks is lost).

  python tpu/delete.py NAME [--project=P] [--zone=Z] [--dry-run]

Also the way out of a FAILED or SUSPENDED (preempted) request, before creating it again.
"""
from __future__ import annotations

import sys

import common


def build(args) -> list[common.Command]:
  """`queued-resources delete --force` (the nodes first, then the request), without a prompt."""
  return [common.gcloud(args, "queued-resources", "delete", args.name, "--force", "--quiet")]


if __name__ == "__main__":
  sys.exit(common.main(build, __doc__))
