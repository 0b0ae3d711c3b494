"""Training-step throughput, MFU and memory of the compiled game step (pre-training payoff), for
several memory/speed settings measured in one run.

  python -m benchmarks.train_step [--d_model 512 --d_ff 1376 --n_layers 8 --n_heads 8
                                   --vocab_size 512 --seq_len 256 --batch 8 --steps 5]
                                  [--settings baseline,remat_full,remat_dots,bf16,accum4]
                                  [--no_hugepages]

Settings (join several with ``+``: ``remat_full+accum4``): ``baseline`` (f32, no remat, one pass),
``remat_full`` / ``remat_dots`` (``LlamaConfig.remat``), ``bf16`` (``dtype='bfloat16'`` compute on
float32 params and optimizer state), ``accumN`` (``Learner.accumulate=N`` microbatches per update),
``chunkC`` (``LlamaConfig.logits_chunk=C``: the loss reads the logits ``C`` positions at a time).

Prints one JSON line: per setting, tokens/s, model FLOPs/s, MFU = model FLOPs/s / the matmul peak
of the setting's compute dtype (f32, or bf16 for ``bf16``) measured in this process, and the
compiled step's memory from XLA's buffer assignment (``Compiled.memory_analysis()``:
``temp_bytes``, the step's live intermediates, activations included; ``argument_bytes``,
``output_bytes``, ``alias_bytes`` (donated state written in place); ``step_bytes`` = temp +
argument + output - alias; ``xla_peak_bytes``), with ratios to the first setting (``baseline`` by
default). Model FLOPs per token: ``lm.flops_per_token`` (6 x matmul params + causal attention), the
standard accounting, so recomputation (remat) lowers MFU. The process's peak RSS (``ru_maxrss``,
all settings together) is printed too; it is not per setting. The baseline's figures are also at
the top level (``tokens_per_s``, ``mfu``, ...), as before.

Run as a script, it first re-executes itself with glibc malloc on transparent huge pages (see
``gamejax.hostenv``; ``--no_hugepages`` to measure without), the setting a
training run on CPU should use too; ``malloc_hugepages`` in the JSON says which it measured. The
matmul peak is measured in the same process, under the same setting.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from gamejax import hostenv, sharding, step as game_step
from gamejax.models import lm
from gamejax.payoffs import imitation


DEFAULT_SETTINGS = "baseline,remat_full,remat_dots,bf16,accum4"
CPU_REMAT_NOTE = ("XLA:CPU expands remat's optimization barriers away: the remat settings "
                  "recompute the blocks (more dots, more time) but the CPU step's buffer "
                  "assignment (temp_bytes) does not shrink; the barriers are what keeps "
                  "activations dead on GPU/TPU (not measured here). Gradient accumulation "
                  "shrinks temp_bytes on any backend")


def parse_setting(name: str) -> dict:
  """``{"remat", "dtype", "accumulate"}`` of a setting name (``remat_full+accum4``), and
  ``"logits_chunk"`` where it names one (``chunk32``; else the model file's)."""
  out = {"remat": "none", "dtype": "float32", "accumulate": 1}
  for part in name.split("+"):
    if part == "baseline":
      continue
    if part.startswith("remat_"):
      out["remat"] = part[len("remat_"):]
    elif part == "bf16":
      out["dtype"] = "bfloat16"
    elif part.startswith("accum") and part[len("accum"):].isdigit():
      out["accumulate"] = int(part[len("accum"):])
    elif part.startswith("chunk") and part[len("chunk"):].isdigit():
      out["logits_chunk"] = int(part[len("chunk"):])
    else:
      raise SystemExit(f"--settings: unknown setting {part!r} in {name!r}; expected baseline, "
                       "remat_<policy>, bf16, accum<N>, chunk<C>, joined with '+'")
  return out


def measure(cfg, accumulate: int, args, mesh, peak: float) -> dict:
  """One setting: compile the step, read XLA's memory figures, time ``args.steps`` calls."""
  learner = game_step.Learner(lm.bind(cfg),
                              imitation(("agent", "opponent")), optax.adamw(1e-4),
                              accumulate=accumulate)
  game = game_step.Game(learners={"agent": learner})
  params = lm.init_params(cfg, jax.random.PRNGKey(0))
  state = game_step.init_state(game, {"agent": params}, jax.random.PRNGKey(1))
  fn, shardings = game_step.make_step(game, mesh, jax.eval_shape(lambda: state))
  state = jax.device_put(state, shardings)
  rng = np.random.default_rng(0)
  shape = (1, args.batch, args.seq_len)
  batch = dict(tokens=rng.integers(3, cfg.vocab_size, shape).astype(np.int32),
               positions=np.broadcast_to(np.arange(args.seq_len, dtype=np.int32), shape).copy(),
               segment_ids=np.ones(shape, np.int32),
               players=rng.integers(1, 3, shape).astype(np.int32))
  batch = jax.device_put(batch, sharding.batch_sharding(mesh, leading=1))
  t = time.perf_counter()
  compiled = fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  memory = {"temp_bytes": mem.temp_size_in_bytes, "argument_bytes": mem.argument_size_in_bytes,
            "output_bytes": mem.output_size_in_bytes, "alias_bytes": mem.alias_size_in_bytes,
            "step_bytes": (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                           + mem.output_size_in_bytes - mem.alias_size_in_bytes),
            "xla_peak_bytes": getattr(mem, "peak_memory_in_bytes", None)}
  secs, _ = common.median_step_seconds(compiled, state, batch, args.steps)
  tokens = args.batch * args.seq_len
  flops = lm.flops_per_token(cfg, args.seq_len) * tokens / secs
  return {"seconds_per_step": secs, "tokens_per_s": tokens / secs, "model_flops_per_s": flops,
          "mfu": flops / peak, "compile_s": compile_s, **memory}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  common.add_model_flags(p)
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=5, help="timed calls (one game step each)")
  p.add_argument("--settings", default=DEFAULT_SETTINGS,
                 help="comma-separated settings, the first the reference of the ratios")
  args = common.parse_args(p, argv)
  base = common.model_config(args)
  names = [n for n in args.settings.split(",") if n]
  settings = {name: parse_setting(name) for name in names}
  for name, s in settings.items():
    if args.batch % s["accumulate"]:
      raise SystemExit(f"--settings {name}: --batch={args.batch} does not split into "
                       f"{s['accumulate']} microbatches")

  mesh = sharding.make_mesh()
  # Each setting's MFU is against the matmul peak of its compute dtype, measured here.
  peaks = {dtype: common.matmul_peak_flops(dtype=jnp.dtype(dtype))
           for dtype in dict.fromkeys(s["dtype"] for s in settings.values())}
  peak = peaks.get("float32") or max(peaks.values())
  results = {}
  for name, s in settings.items():
    cfg = dataclasses.replace(base, **{k: v for k, v in s.items() if k != "accumulate"})
    results[name] = measure(cfg, s["accumulate"], args, mesh, peaks[s["dtype"]])
    results[name]["matmul_peak_flops_per_s"] = peaks[s["dtype"]]
  ref = results[names[0]]
  for r in results.values():
    r["tokens_per_s_ratio"] = r["tokens_per_s"] / ref["tokens_per_s"]
    r["temp_bytes_ratio"] = r["temp_bytes"] / max(ref["temp_bytes"], 1)
    r["step_bytes_ratio"] = r["step_bytes"] / max(ref["step_bytes"], 1)
  top = {k: results["baseline"][k] for k in ("seconds_per_step", "tokens_per_s",
                                             "model_flops_per_s", "mfu")} if "baseline" in results else {}
  print(json.dumps({
      "benchmark": "train_step", **common.device_info(),
      "params": lm.param_count(base), "batch": args.batch, "seq_len": args.seq_len, **top,
      "matmul_peak_flops_per_s": peak,
      "memory": "per setting: XLA buffer assignment of the compiled step (memory_analysis); "
                "process_peak_rss_bytes: the whole process, all settings",
      "settings": results, "reference": names[0],
      "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      **({"note": CPU_REMAT_NOTE} if jax.default_backend() == "cpu" else {}),
      "malloc_hugepages": hostenv.malloc_hugepages_enabled()}))


if __name__ == "__main__":
  main()
