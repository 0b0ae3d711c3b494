"""What the Cloud TPU scripts share: flags, the gcloud commands they build, and how they run them.

Every script builds a list of commands (argv lists) and hands it to :func:`execute`, which prints
them with ``--dry-run`` (one per line, pasteable) or runs them one after another, stopping at the
first that fails. The TPU VM (or pod slice) is named like its queued resource.

Paths on the workers are relative to the worker's home directory unless absolute; they default to
:data:`REMOTE_DIR` (the gamejax checkout), :data:`VENV` (its Python environment), :data:`LOG` and
:data:`PIDFILE` (the detached ``gamejax train`` process).
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from typing import Sequence

REMOTE_DIR = "gamejax"
VENV = "gamejax-venv"
LOG = "gamejax-train.log"
PIDFILE = "gamejax-train.pid"

Command = list[str]

# A shell function for remote commands: whether process $1 runs (a zombie, exited but not yet
# reaped by its new parent, does not).
ALIVE = ("alive() { kill -0 \"$1\" 2>/dev/null && ! ps -o stat= -p \"$1\" | grep -q '^Z'; }")


class UsageError(Exception):
  """A missing or bad flag; the scripts report it and exit 2 with nothing run."""


def parser(description: str) -> argparse.ArgumentParser:
  """An argument parser with the flags every script takes: NAME, --project, --zone, --dry-run."""
  p = argparse.ArgumentParser(description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              allow_abbrev=False)
  p.add_argument("name", metavar="NAME", help="the queued resource and its TPU VM (or slice)")
  p.add_argument("--project", default=None,
                 help="Google Cloud project (default: $CLOUDSDK_CORE_PROJECT)")
  p.add_argument("--zone", default=None, help="zone of the TPU (default: $CLOUDSDK_COMPUTE_ZONE)")
  p.add_argument("--dry-run", action="store_true",
                 help="print the commands, one per line, and run nothing")
  return p


def add_remote_paths(p: argparse.ArgumentParser) -> None:
  """Adds --remote-dir and --venv: where the checkout and its environment live on each worker."""
  p.add_argument("--remote-dir", default=REMOTE_DIR,
                 help=f"the gamejax checkout on each worker (default: ~/{REMOTE_DIR})")
  p.add_argument("--venv", default=VENV,
                 help=f"its Python virtual environment on each worker (default: ~/{VENV})")


def location(args: argparse.Namespace) -> tuple[str, str]:
  """``(project, zone)`` from the flags or the environment; UsageError naming what is missing."""
  project = args.project or os.environ.get("CLOUDSDK_CORE_PROJECT")
  zone = args.zone or os.environ.get("CLOUDSDK_COMPUTE_ZONE")
  missing = ([] if project else ["the project (--project=PROJECT or $CLOUDSDK_CORE_PROJECT)"]) + (
      [] if zone else ["the zone (--zone=ZONE or $CLOUDSDK_COMPUTE_ZONE)"])
  if missing:
    raise UsageError("missing " + " and ".join(missing))
  return project, zone


def gcloud(args: argparse.Namespace, *words: str) -> Command:
  """``gcloud compute tpus WORDS... --project=P --zone=Z``."""
  project, zone = location(args)
  return ["gcloud", "compute", "tpus", *words, f"--project={project}", f"--zone={zone}"]


def ssh(args: argparse.Namespace, remote_command: str, worker: str = "all") -> Command:
  """Runs ``remote_command`` (a shell command line) on ``worker`` (0, 1, ... or all) of the VM."""
  return gcloud(args, "tpu-vm", "ssh", args.name, f"--worker={worker}",
                f"--command={remote_command}")


def scp(args: argparse.Namespace, local: str, remote: str, worker: str = "all") -> Command:
  """Copies the file ``local`` to ``remote`` (relative to home) on ``worker`` of the TPU VM."""
  return gcloud(args, "tpu-vm", "scp", local, f"{args.name}:{remote}", f"--worker={worker}")


def remote_path(path: str) -> str:
  """A worker path as a shell word: absolute paths quoted, others anchored at ``~/`` then quoted.

  >>> remote_path("gamejax-venv"), remote_path("runs/a b"), remote_path("/mnt/a b")
  ('~/gamejax-venv', "~/'runs/a b'", "'/mnt/a b'")
  """
  return shlex.quote(path) if os.path.isabs(path) else "~/" + shlex.quote(path)


def checked_dir(flag: str, path: str) -> str:
  """``path`` if it names a folder of its own on the worker (not ``~``, ``/`` or above ``~``)."""
  norm = os.path.normpath(path)
  if norm in (".", "/", "~") or norm.startswith(".."):
    raise UsageError(f"{flag}={path}: expected a folder of its own, e.g. {flag}=gamejax")
  return path


def shell_join(*parts: str) -> str:
  """Joins already quoted shell fragments with `` && ``: each runs only if the last succeeded."""
  return " && ".join(parts)


def execute(commands: Sequence[Command], dry_run: bool) -> int:
  """Prints ``commands`` (dry run) or runs them in order; the exit code of the first that fails."""
  for command in commands:
    if dry_run:
      print(shlex.join(command))
      continue
    print("+ " + shlex.join(command), file=sys.stderr, flush=True)
    code = subprocess.run(command).returncode
    if code:
      print(f"error: exit code {code} from {command[0]}", file=sys.stderr)
      return code
  return 0


def main(build, description: str, configure=None, run=None, gin: bool = False,
         argv: Sequence[str] | None = None) -> int:
  """Parses flags, builds the commands and runs them; the script's exit code.

  ``configure(parser)`` adds the script's own flags; with ``gin``, the ``--gin.*`` arguments are
  taken out of argv first (a value may hold spaces, which argparse would take for a positional)
  and left in ``args.gin`` for ``build`` to judge. ``build(args)`` returns the commands, or raises
  UsageError: then the script exits 2 with nothing run. ``run(args, commands)`` runs them when not
  a dry run (default: :func:`execute`).
  """
  p = parser(description)
  if configure:
    configure(p)
  argv = list(sys.argv[1:] if argv is None else argv)
  bindings = [a for a in argv if gin and a.startswith("--gin.")]
  args = p.parse_args([a for a in argv if a not in bindings])
  args.gin = bindings
  try:
    commands = build(args)
  except UsageError as e:
    print(f"{p.prog}: error: {e}", file=sys.stderr)
    return 2
  if args.dry_run or run is None:
    return execute(commands, args.dry_run)
  return run(args, commands)
