"""Shared benchmark helpers: timing, the measured f32 matmul peak, model flags."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import gin
import jax
import jax.numpy as jnp

from gamejax import config, hostenv
from gamejax.run import reproduce
from gamejax.models import llama, lm


MODEL_FLAGS = ("vocab_size", "d_model", "d_ff", "n_layers", "n_heads", "n_kv_heads")


class BenchmarkFailed(RuntimeError):
  """A benchmark process exited non-zero or printed no JSON line."""


def device_info() -> dict:
  """Where a benchmark ran, for its JSON line: JAX's device kind and the host CPU
  (``reproduce.host_cpu``; on the CPU backend the figures depend on which CPU it is)."""
  return {"device": jax.devices()[0].device_kind, "host_cpu": reproduce.host_cpu()}

def run_benchmark(module: str, args: list[str], cwd: str, env: dict | None = None,
                  timeout: float | None = None) -> dict:
  """One ``python -m benchmarks.<module> <args>`` process run in ``cwd`` (this interpreter):
  the last JSON line it printed. Raises ``BenchmarkFailed`` (its exit status and the end of its
  stderr) when it fails or prints none, ``subprocess.TimeoutExpired`` past ``timeout`` seconds."""
  proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    raise BenchmarkFailed(f"benchmarks.{module} {' '.join(args)} exited {proc.returncode}:\n"
                          f"{proc.stderr[-1500:]}")
  return json.loads(lines[-1])


def parse_cases(p: argparse.ArgumentParser, value: str, known) -> list[str]:
  """The comma-separated ``--cases`` value as a list; a parser error unless it names some of
  ``known`` and nothing else."""
  cases = [c for c in value.split(",") if c]
  unknown = [c for c in cases if c not in known]
  if unknown or not cases:
    p.error(f"--cases must name some of {list(known)} (unknown: {unknown})")
  return cases


def model_bindings(gin_file: str) -> dict:
  """The ``LlamaConfig`` fields bound in ``experiments/<gin_file>`` (one place for each model)."""
  path = gin_file if os.path.isabs(gin_file) else os.path.join(config.repo_experiments_dir(),
                                                                gin_file)
  if not os.path.exists(path):
    raise SystemExit(f"--model: no model gin file {path}")
  config.register()
  gin.clear_config()
  gin.parse_config_file(path)
  out = {}
  for field in dataclasses.fields(llama.LlamaConfig):
    try:
      out[field.name] = gin.query_parameter(f"LlamaConfig.{field.name}")
    except ValueError:      # not bound in this file
      pass
  gin.clear_config()
  return out


def model_sizes(gin_file: str) -> dict[str, int]:
  """The sizes (``MODEL_FLAGS``) bound in ``experiments/<gin_file>``."""
  bound = model_bindings(gin_file)
  return {name: bound[name] for name in MODEL_FLAGS}


def add_model_flags(p: argparse.ArgumentParser, gin_file: str = "models/bench.gin") -> None:
  """``--model`` (a model gin file under ``experiments/``, default ``gin_file``: every
  ``LlamaConfig`` field it binds) and ``--vocab_size --d_model ...`` flags that override its
  sizes."""
  p.add_argument("--model", default=gin_file,
                 help=f"model gin file under experiments/ (default {gin_file}), e.g. "
                      "models/1b.gin; the size flags override its sizes")
  for name, value in model_sizes(gin_file).items():
    p.add_argument(f"--{name}", type=int, default=None,
                   help=f"(default: --model's; {value} in {gin_file})")


def model_config(args) -> lm.Config:
  """The ``LlamaConfig`` of ``--model`` with the size flags given on top."""
  fields = model_bindings(args.model)
  fields.update({name: getattr(args, name) for name in MODEL_FLAGS
                 if getattr(args, name) is not None})
  return llama.LlamaConfig(**fields)


def parse_args(p: argparse.ArgumentParser, argv=None):
  """Adds ``--no_hugepages``, parses, and (run as a script) re-executes with glibc malloc on
  transparent huge pages (``gamejax.hostenv``), the setting a CPU run should use too."""
  p.add_argument("--no_hugepages", action="store_true",
                 help="keep 4 KiB pages for malloc (no re-exec with GLIBC_TUNABLES)")
  args = p.parse_args(argv)
  if argv is None and not args.no_hugepages:
    hostenv.reexec_with_malloc_hugepages()
  return args


def median_step_seconds(step, state, batch, n: int):
  """``(median seconds, final state)`` of ``n`` calls of ``step(state, batch)``, each blocking on
  its metrics, after two warm-up calls (the first compiles)."""
  holder = [state]

  def one():
    holder[0], metrics = step(holder[0], batch)
    jax.block_until_ready(metrics)

  secs = statistics.median(time_calls(one, n, warmup=2))
  return secs, holder[0]


def time_calls(fn, n: int, warmup: int = 1) -> list[float]:
  """Seconds of each of ``n`` calls of ``fn`` (which must block) after ``warmup`` calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(n):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return times


def best_seconds(fn, n: int) -> float:
  """The fastest of ``n`` calls of ``fn`` (which must block) after two warm-up calls: a part of a
  step timed on its own, for a breakdown (the fastest is the least disturbed by other jobs)."""
  return min(time_calls(fn, n, warmup=2))


CPU_PEAK_SHAPES = ((2048, 512, 1376), (2048, 1376, 512), (1024, 1024, 1024))
ACCELERATOR_PEAK_SHAPES = ((8192, 8192, 8192),)   # small GEMMs cannot fill a GPU/TPU


def matmul_peak_flops(sizes=None, dtype=jnp.float32) -> float:
  """The best matmul throughput (FLOP/s) this process reaches on a few GEMM shapes, with inputs
  of ``dtype`` (float32, or bfloat16 for a bf16 step's MFU; default precision, as the model's
  matmuls run; shapes large enough to fill the device)."""
  if sizes is None:
    sizes = CPU_PEAK_SHAPES + (() if jax.default_backend() == "cpu" else ACCELERATOR_PEAK_SHAPES)
  best = 0.0
  for m, k, n in sizes:
    a = jax.random.normal(jax.random.PRNGKey(0), (m, k), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (k, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: x @ y)
    secs = statistics.median(time_calls(lambda: f(a, b).block_until_ready(), 7, warmup=2))
    best = max(best, 2 * m * k * n / secs)
  return best
