"""Host process setup for CPU runs: glibc malloc on transparent huge pages.

XLA:CPU allocates a step's buffers afresh on every call; without huge pages each step page-faults
them in again 4 KiB at a time. ``gamejax train`` and the benchmarks re-execute themselves once
with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (set ``GAMEJAX_NO_HUGEPAGES=1`` to opt out).
"""
from __future__ import annotations

import os
import platform
import sys

MALLOC_HUGEPAGES = "glibc.malloc.hugetlb=1"


def malloc_hugepages_enabled() -> bool:
  """Whether this process's glibc malloc backs its memory with transparent huge pages."""
  return MALLOC_HUGEPAGES in os.environ.get("GLIBC_TUNABLES", "").split(":")


def reexec_with_malloc_hugepages() -> None:
  """Re-run this process (same command line) with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``.

  XLA:CPU allocates a step's buffers afresh on every call and glibc returns the big ones to the
  kernel on free, so each step page-faults (and the kernel zeroes) all of them again, 4 KiB at a
  time: about 57k faults and a quarter of the arena model's step on 2 cores. With the tunable,
  glibc ``madvise``s its memory for transparent huge pages (2 MiB), which cuts the faults ~500x.
  The tunable is read only at process start, hence the re-exec. Does nothing unless on Linux with
  glibc and transparent huge pages not ``never``, or when it is already set.
  """
  if (malloc_hugepages_enabled() or os.environ.get("GAMEJAX_NO_HUGEPAGES")
      or sys.platform != "linux" or platform.libc_ver()[0] != "glibc"):
    return
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      if "[never]" in f.read():
        return
  except OSError:
    return
  tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]
  env = {**os.environ, "GLIBC_TUNABLES": ":".join(tunables + [MALLOC_HUGEPAGES])}
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)
