#!/usr/bin/env python3
"""Starts `gamejax train` on every worker of a TPU VM or slice, detached, logging to a file.

  python tpu/launch.py NAME --gin_file=FILE [--gin_file=...] --workdir=DIR [--resume]
                       [--gin.KEY=VALUE ...] [--log=gamejax-train.log]
                       [--remote-dir=gamejax] [--venv=gamejax-venv]
                       [--project=P] [--zone=Z] [--dry-run]

Every worker runs the same command, in the checkout `tpu/install.py` made (so --gin_file paths
are relative to it, like experiments/arithmetic/grpo.gin); on a multi-host slice `gamejax train`
joins the workers into one JAX job by itself. --workdir must be an absolute path that every
worker sees as the same folder (a Filestore/NFS share or a gcsfuse-mounted bucket), and that
survives the VM: checkpoints go there, and a relaunch with --resume continues from them.
Each --gin.KEY=VALUE reaches the workers' `gamejax train` exactly as given here.
"""
from __future__ import annotations

import os
import shlex
import sys

import common


def configure(p) -> None:
  """Adds the `gamejax train` flags and where the run's log and pid file go."""
  p.add_argument("--gin_file", action="append", required=True,
                 help="gin file, relative to the checkout on the workers (repeatable)")
  p.add_argument("--workdir", required=True,
                 help="run directory: an absolute path on storage shared by all workers")
  p.add_argument("--resume", action="store_true",
                 help="continue the run in --workdir (starts one if there is none yet)")
  p.add_argument("--log", default=common.LOG,
                 help=f"the log file on each worker (default: ~/{common.LOG})")
  common.add_remote_paths(p)


def gin_bindings(flags: list[str]) -> list[str]:
  """The ``--gin.KEY=VALUE`` flags as given; UsageError for one without ``=VALUE``."""
  for flag in flags:
    if "=" not in flag or flag.index("=") == len("--gin."):
      raise common.UsageError(f"{flag}: expected --gin.KEY=VALUE as one argument "
                              "(quote a VALUE with spaces)")
  return list(flags)


def train_argv(args) -> list[str]:
  """The `gamejax train` command line every worker runs."""
  if not os.path.isabs(args.workdir):
    raise common.UsageError(f"--workdir={args.workdir}: expected an absolute path on storage "
                            "every worker mounts at the same place, e.g. /mnt/shared/runs/grpo")
  return (["gamejax", "train"] + [f"--gin_file={f}" for f in args.gin_file] +
          [f"--workdir={args.workdir}", "--no_progress"] + (["--resume"] if args.resume else []) +
          gin_bindings(args.gin))


def remote_launch(args) -> str:
  """The shell command each worker runs: refuse if a run is live, else start one under nohup."""
  checkout = common.remote_path(args.remote_dir)
  venv = common.remote_path(args.venv)
  log, pidfile = common.remote_path(args.log), common.remote_path(common.PIDFILE)
  train = " ".join(shlex.quote(word) for word in train_argv(args))
  return "; ".join([
      f"cd {checkout} || exit 1",
      common.ALIVE,
      f'if [ -f {pidfile} ] && alive "$(cat {pidfile})"; then '
      f'echo "$(hostname): gamejax train is running already (pid $(cat {pidfile}))" >&2; '
      "exit 1; fi",
      f". {venv}/bin/activate || exit 1",
      f"nohup {train} > {log} 2>&1 < /dev/null & echo $! > {pidfile}",
      f'echo "$(hostname): started gamejax train, pid $!, log" {shlex.quote(args.log)}'])


def build(args) -> list[common.Command]:
  """One ssh to all workers."""
  return [common.ssh(args, remote_launch(args))]


if __name__ == "__main__":
  sys.exit(common.main(build, __doc__, configure, gin=True))
