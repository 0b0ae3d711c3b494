#!/usr/bin/env python3
"""Requests a TPU VM or a multi-host pod slice as a queued resource (its node is named like it).

  python tpu/create.py NAME --accelerator-type=TYPE [--runtime-version=V] [--spot] [--wait]
                       [--project=P] [--zone=Z] [--dry-run]

TYPE is e.g. v5litepod-8 (one host), v5litepod-16 (a slice of 4 hosts), v4-8, v4-32, v6e-8.
Without --runtime-version, the TPU software version is chosen from the TPU generation.
"""
from __future__ import annotations

import sys

import common
import wait

# The TPU VM software version for each generation (prefix of the accelerator type).
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}


def configure(p) -> None:
  """Adds the flags of the request."""
  p.add_argument("--accelerator-type", required=True, help="e.g. v5litepod-16, v4-32, v6e-8")
  p.add_argument("--runtime-version", default=None,
                 help="TPU software version (default by generation: " +
                 ", ".join(f"{k}: {v}" for k, v in RUNTIME_VERSIONS.items()) + ")")
  p.add_argument("--spot", action="store_true",
                 help="Spot VMs: much cheaper, but may be preempted at any time")
  p.add_argument("--wait", action="store_true", help="then poll until the resource is ACTIVE")
  wait.configure(p)


def runtime_version(args) -> str:
  """--runtime-version, or the one for the accelerator type's generation."""
  if args.runtime_version:
    return args.runtime_version
  generation = args.accelerator_type.rsplit("-", 1)[0]
  if generation not in RUNTIME_VERSIONS:
    raise common.UsageError(f"--accelerator-type={args.accelerator_type}: no default runtime "
                            "version for it; pass --runtime-version (see `gcloud compute tpus "
                            "tpu-vm versions list`)")
  return RUNTIME_VERSIONS[generation]


def build(args) -> list[common.Command]:
  """The create request, and with --wait the state poll after it."""
  create = common.gcloud(args, "queued-resources", "create", args.name, f"--node-id={args.name}",
                         f"--accelerator-type={args.accelerator_type}",
                         f"--runtime-version={runtime_version(args)}")
  commands = [create + (["--spot"] if args.spot else [])]
  return commands + (wait.build(args) if args.wait else [])


def run(args, commands) -> int:
  """Sends the request, then (with --wait) polls until ACTIVE."""
  code = common.execute(commands[:1], dry_run=False)
  return code or (wait.poll(args, commands[1:]) if args.wait else 0)


if __name__ == "__main__":
  sys.exit(common.main(build, __doc__, configure, run=run))
