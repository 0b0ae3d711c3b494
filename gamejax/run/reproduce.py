"""Where a run came from, and whether a re-run reproduces it.

``gamejax train`` writes ``environment.json`` into the run directory: the package versions, the
git commit of gamejax, Python, the platform and its devices (``environment()``), and each resume's
too. ``gamejax reproduce`` re-runs a finished run from its ``config.gin`` (its seed included) into
a new directory and compares the two (``compare_runs``): every ``metrics.jsonl`` row but the
timings, and each stage's final params. On the same platform (the same JAX backend, device kind
and count, the same jax/jaxlib, and on the CPU backend the same kind of host CPU) they must be
bitwise equal; elsewhere within ``TOLERANCE``.

The host CPU matters: XLA:CPU picks its kernels by the instruction sets it finds, and they round
differently. On an AMD EPYC with AVX-512 a row of a GEMM rounds differently with the number of
rows multiplied, and the arithmetic pipeline's pre-training ends at held-out 0.980 there where
another 2-core host gave 0.642 (same commit, same packages).
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from typing import Any, Mapping

import jax
import numpy as np

PACKAGES = ("gamejax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy",
            "gin-config", "tensorflow-datasets", "array-record", "transformers", "torch")
# Metrics that measure time, not the run's numbers: never compared.
TIMINGS = ("tokens_per_s",)
# Across platforms (another accelerator, other library versions): relative and absolute.
TOLERANCE = {"rtol": 1e-3, "atol": 1e-4}
ENVIRONMENT_FILE = "environment.json"


def git_commit(path: str) -> dict | None:
  """``{"commit", "dirty"}`` of the git checkout holding ``path`` (None when there is none)."""
  def git(*args):
    return subprocess.run(["git", "-C", path, *args], capture_output=True, text=True,
                          timeout=10, check=True).stdout.strip()
  try:
    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
  except (OSError, subprocess.SubprocessError):
    return None
  return {"commit": commit, "dirty": dirty}


# Instruction sets XLA:CPU chooses kernels by (the width of its GEMMs' and reductions' vectors):
# hosts that differ in them can give different bits from one program.
CPU_FEATURES = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "asimd", "sve", "sve2")


def host_cpu(cpuinfo: str = "/proc/cpuinfo") -> dict:
  """``{"model", "features"}`` of the host CPU: its vendor, family, model and name as Linux's
  ``cpuinfo`` gives them, and which of ``CPU_FEATURES`` it has (elsewhere: the platform's
  processor name and no features)."""
  fields, flags = {}, set()
  try:
    with open(cpuinfo, encoding="utf-8", errors="replace") as f:
      for line in f:
        if not line.strip():
          break                            # the first processor is enough
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("flags", "Features"):
          flags = set(value.split())
        elif key in ("vendor_id", "cpu family", "model", "model name", "CPU implementer",
                     "CPU part"):
          fields[key] = value
  except OSError:
    pass
  model = " / ".join(f"{k} {v}" for k, v in fields.items()) or (
      platform.processor() or platform.machine())
  return {"model": model, "features": sorted(flags & set(CPU_FEATURES))}


def environment() -> dict:
  """This process's package versions, gamejax's git commit, Python, platform and devices."""
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  devices = jax.devices()
  return {"packages": versions,
          "gamejax_git": git_commit(os.path.dirname(os.path.abspath(__file__))),
          "python": sys.version.split()[0], "system": f"{platform.system()} {platform.machine()}",
          "backend": jax.default_backend(), "device_kind": devices[0].device_kind,
          "device_count": len(devices), "process_count": jax.process_count(),
          "host_cpu": host_cpu(), "command": sys.argv}


def record_environment(workdir: str) -> None:
  """Writes (first run) or extends (a resume) ``environment.json`` in ``workdir``."""
  from gamejax.run.loop import write_json_atomic
  path = os.path.join(workdir, ENVIRONMENT_FILE)
  here = environment()
  if os.path.exists(path):
    with open(path) as f:
      record = json.load(f)
    record.setdefault("resumed", []).append(here)
  else:
    record = {"started": here}
  write_json_atomic(path, record)


def same_platform(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
  """Whether two environments should give bitwise-equal runs: the same backend, devices and
  jax/jaxlib, and on the CPU backend the same host CPU (when both records name it; records
  written before gamejax recorded it do not)."""
  keys = ("backend", "device_kind", "device_count", "process_count")
  same_cpu = (a.get("backend") != "cpu" or "host_cpu" not in a or "host_cpu" not in b
              or a["host_cpu"] == b["host_cpu"])
  return (all(a.get(k) == b.get(k) for k in keys) and same_cpu
          and all(a.get("packages", {}).get(p) == b.get("packages", {}).get(p)
                  for p in ("jax", "jaxlib")))


def version_changes(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict:
  """``{package: [recorded, now]}`` for each package whose version differs."""
  pa, pb = a.get("packages", {}), b.get("packages", {})
  return {p: [pa.get(p), pb.get(p)] for p in sorted(set(pa) | set(pb)) if pa.get(p) != pb.get(p)}


def read_metrics(path: str) -> dict:
  """``{(stage, step, kind): row}`` of a metrics.jsonl, without its timings (``kind``: "eval"
  for held-out rows, "train" for the others)."""
  rows = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      kind = "eval" if any(k.startswith("eval/") for k in row) else "train"
      key = (row.get("stage"), row.get("step"), kind)
      rows[key] = {k: v for k, v in row.items() if k not in TIMINGS}
  return rows


def _diff(a, b) -> float:
  """The largest absolute difference of two numbers or arrays (inf: they differ in shape)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    return float("inf")
  if not a.size:
    return 0.0
  both_nan = np.isnan(a) & np.isnan(b)
  return float(np.max(np.where(both_nan, 0.0, np.abs(a - b)), initial=0.0))


def _close(a, b, bitwise: bool) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape:
    return False
  if bitwise:
    return a.dtype == b.dtype and a.tobytes() == b.tobytes()
  return bool(np.allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), equal_nan=True,
                          **TOLERANCE))


def compare_metrics(old: dict, new: dict, bitwise: bool) -> dict:
  """Rows missing on either side and the values that differ (the first 10), with the largest
  absolute difference."""
  missing = sorted(str(k) for k in set(old) ^ set(new))
  differ, largest = [], 0.0
  for key in sorted(set(old) & set(new), key=str):
    for name in sorted(set(old[key]) | set(new[key])):
      a, b = old[key].get(name), new[key].get(name)
      if isinstance(a, str) or isinstance(b, str) or a is None or b is None:
        if a != b:
          differ.append(f"{key} {name}: {a!r} vs {b!r}")
        continue
      largest = max(largest, _diff(a, b))
      if not _close(a, b, bitwise):
        differ.append(f"{key} {name}: {a!r} vs {b!r}")
  return {"rows": len(old), "missing_rows": missing[:10], "differing": differ[:10],
          "differing_count": len(differ), "max_abs_diff": largest,
          "match": not missing and not differ}


def compare_params(old: Any, new: Any, bitwise: bool) -> dict:
  """Whether two params trees are equal (bitwise or within ``TOLERANCE``), and by how much."""
  old_leaves = jax.tree_util.tree_leaves_with_path(old)
  new_leaves = dict(jax.tree_util.tree_leaves_with_path(new))
  differ, largest = [], 0.0
  for path, a in old_leaves:
    b = new_leaves.pop(path, None)
    name = jax.tree_util.keystr(path)
    if b is None:
      differ.append(f"{name}: missing in the re-run")
      continue
    a, b = np.asarray(jax.device_get(a)), np.asarray(jax.device_get(b))
    largest = max(largest, _diff(a, b))
    if not _close(a, b, bitwise):
      differ.append(name)
  differ += [f"{jax.tree_util.keystr(p)}: only in the re-run" for p in new_leaves]
  return {"arrays": len(old_leaves), "differing": differ[:10], "differing_count": len(differ),
          "max_abs_diff": largest, "match": not differ}


def compare_runs(exp, old_dir: str, new_dir: str, bitwise: bool) -> dict:
  """The report of ``gamejax reproduce``: metrics and each stage's final params compared."""
  from gamejax.run.pipeline import restore_players
  report = {"mode": "bitwise" if bitwise else f"within rtol={TOLERANCE['rtol']}, "
                                              f"atol={TOLERANCE['atol']}",
            "metrics": compare_metrics(read_metrics(os.path.join(old_dir, "metrics.jsonl")),
                                       read_metrics(os.path.join(new_dir, "metrics.jsonl")),
                                       bitwise),
            "params": {}}
  for i, stage in enumerate(exp.stages):
    old = restore_players(exp, i, old_dir)
    new = restore_players(exp, i, new_dir)
    report["params"][stage.name] = compare_params(old, new, bitwise)
  report["match"] = report["metrics"]["match"] and all(
      p["match"] for p in report["params"].values())
  return report
