#!/usr/bin/env python3
"""Installs gamejax (a commit of this checkout) and JAX for TPU on every worker of a TPU VM.

  python tpu/install.py NAME [--ref=HEAD] [--source=DIR] [--python=python3.11] [--jax=jax[tpu]]
                        [--remote-dir=gamejax] [--venv=gamejax-venv]
                        [--project=P] [--zone=Z] [--dry-run]

`git archive` packs the commit (gamejax/, experiments/, ...: uncommitted changes are left out),
`gcloud ... scp --worker=all` copies it to every worker, and each worker replaces ~/gamejax with
it and installs it (`pip install -e`) with JAX for TPU into ~/gamejax-venv (created with
--python, installed with apt if the image lacks it). Run it again after each commit you want on
the workers.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile

import common

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_ARCHIVE = "gamejax.tar.gz"


def configure(p) -> None:
  """Adds what to install and where."""
  p.add_argument("--ref", default="HEAD", help="the commit to install (default: HEAD)")
  p.add_argument("--source", default=CHECKOUT, help="the gamejax git checkout (default: this one)")
  p.add_argument("--python", default="python3.11", help="the workers' Python (default: python3.11)")
  p.add_argument("--jax", default="jax[tpu]", help="the JAX requirement (default: 'jax[tpu]')")
  common.add_remote_paths(p)


def archive_path(args) -> str:
  """The local archive of the commit."""
  return os.path.join(tempfile.gettempdir(), f"gamejax-{args.name}.tar.gz")


def remote_install(args) -> str:
  """The shell command each worker runs: unpack the archive, make the environment, pip install."""
  python = shlex.quote(args.python)
  checkout = common.remote_path(common.checked_dir("--remote-dir", args.remote_dir))
  venv = common.remote_path(common.checked_dir("--venv", args.venv))
  pip = f"{venv}/bin/pip"
  return common.shell_join(
      f"(command -v {python} >/dev/null || (sudo apt-get update -q && sudo apt-get install -y -q "
      f"{python} {python}-venv))",
      f"rm -rf {checkout}", f"mkdir -p {checkout}",
      f"tar -xzf ~/{REMOTE_ARCHIVE} -C {checkout}",
      f"(test -x {pip} || {python} -m venv {venv})",
      f"{pip} install -q -U pip",
      f"{pip} install -q -e {checkout} {shlex.quote(args.jax)}",
      f"{venv}/bin/python -c 'import gamejax, jax; print(\"jax\", jax.__version__)'")


def build(args) -> list[common.Command]:
  """git archive, scp to all workers, install on all workers."""
  local = archive_path(args)
  return [["git", "-C", args.source, "archive", "--format=tar.gz", f"--output={local}", args.ref],
          common.scp(args, local, REMOTE_ARCHIVE),
          common.ssh(args, remote_install(args))]


def run(args, commands) -> int:
  """Warns when the checkout has uncommitted changes (they are not installed), then runs."""
  status = subprocess.run(
      ["git", "-C", args.source, "status", "--porcelain", "--untracked-files=no"],
      capture_output=True, text=True)
  if status.stdout.strip() and args.ref == "HEAD":
    print("warning: uncommitted changes in the checkout are not installed; commit them first",
          file=sys.stderr)
  return common.execute(commands, dry_run=False)


if __name__ == "__main__":
  sys.exit(common.main(build, __doc__, configure, run=run))
