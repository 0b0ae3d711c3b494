"""Llama-style 1B and 8B training on a TPU v5e-256 and on 8 x H100, on paper (``gamejax.scaling``):
the mesh, per-device memory, step time and tokens/s; and, with ``--cpu``, the calculator against
a compiled step measured on this machine.

  python -m benchmarks.scaling [--batch 256 --seq_len 4096 --efficiency 0.4] [--markdown]
  python -m benchmarks.scaling --cpu [model flags --batch 8 --seq_len 256 --steps 2]

Without ``--cpu`` nothing runs on a device: it prints one JSON line per (model, hardware) with
the plan ``scaling.best_plan`` picks (``scaling.report``), or with ``--markdown`` the tables of
``docs/scaling.md``, which is generated from it (``tests/test_scaling.py`` checks they agree).

``--cpu`` compiles and times the pre-training game step (``benchmarks.train_step``, settings
``baseline`` and ``accum4``) on one CPU device with the f32 matmul peak measured in the same
process, and prints one JSON line with, per setting, the calculator's figures beside XLA's: its
compute-time floor (the executed FLOPs at the measured peak) and the measured step time, and its
per-device bytes (params and AdamW state; gradients, the accumulator and activations) beside
``memory_analysis()``'s arguments and temporaries.
"""
from __future__ import annotations

import argparse
import json

from benchmarks import common
from gamejax import hostenv, scaling
from gamejax.models import lm

MODELS = {"Llama-3.2-1B-like": scaling.LLAMA_1B, "Llama-3.1-8B-like": scaling.LLAMA_8B}
HARDWARE = (scaling.TPU_V5E_256, scaling.H100_X8)
GIB = 2.0 ** 30


def plans(batch: int, seq_len: int, efficiency: float) -> list[tuple[str, scaling.Hardware,
                                                                       list[scaling.Plan]]]:
  """``(model name, hardware, ranked plans)`` for every model on every hardware."""
  return [(name, hw, scaling.ranked(cfg, batch, seq_len, hw, efficiency=efficiency))
          for name, cfg in MODELS.items() for hw in HARDWARE]


def _mesh(plan: scaling.Plan) -> str:
  return " x ".join(str(n) for n in plan.mesh)


def _gib(x: float) -> str:
  return f"{x / GIB:.2f}"


def _plan_row(name: str, hw: scaling.Hardware, plan: scaling.Plan, efficiency: float) -> str:
  m, t = scaling.memory(plan), scaling.step_time(plan, hw, efficiency)
  return (f"| {name} | {hw.name} | {_mesh(plan)} | {plan.cfg.remat} | "
          f"{plan.grad_accumulation} x {plan.rows_per_microbatch} | "
          f"{_gib(m['params'])} / {_gib(m['opt_state'])} / "
          f"{_gib(m['grads'] + m['grad_accumulator'])} / "
          f"{_gib(m['gathered_params'])} / {_gib(m['activations'])} | "
          f"**{_gib(m['total'])}** of {_gib(hw.memory_bytes)} | "
          f"{t['compute']:.3f} / {t['comm_fsdp'] + t['comm_data']:.3f} / {t['comm_tensor']:.3f}"
          f" / {t['optimizer']:.4f} | **{t['step']:.3f}** | {t['tokens_per_s']:,.0f} | "
          f"{t['mfu']:.2f} |")


def markdown(batch: int, seq_len: int, efficiency: float) -> str:
  """The tables of ``docs/scaling.md``."""
  ranked = plans(batch, seq_len, efficiency)
  out = [f"Global batch {batch} sequences x {seq_len} tokens = {batch * seq_len:,} tokens per "
         f"update; bf16 compute, float32 params, gradients and AdamW moments; compute at "
         f"{efficiency} of peak.", "",
         "| model | params (`lm.param_count`) | training FLOPs per token (`lm.flops_per_token`) "
         "| model FLOPs per update |", "|---|---|---|---|"]
  for name, cfg in MODELS.items():
    f = lm.flops_per_token(cfg, seq_len)
    out.append(f"| {name} | {lm.param_count(cfg):,} | {f / 1e9:.3f} G | "
               f"{f * batch * seq_len / 1e15:.2f} P |")
  head = ("| model | hardware | mesh data x fsdp x tensor | remat | microbatches x rows "
          "| GiB per device: params / AdamW / grads (+acc.) / weight copies / activations "
          "| total GiB | s: compute / fsdp+data / tensor / optimizer | step s | tokens/s | MFU |")
  rule = "|---|---|---|---|---|---|---|---|---|---|---|"
  out += ["", "**The plan chosen** (fastest estimate that fits in "
          f"{scaling.USABLE_MEMORY:.0%} of a device's memory):", "", head, rule]
  for name, hw, ps in ranked:
    out.append(_plan_row(name, hw, ps[0], efficiency) if ps else
               f"| {name} | {hw.name} | nothing fits |" + " |" * 8)
  out += ["", "**Alternatives**: the fastest plan that fits with each remat policy, and with "
          "pure data parallelism (`fsdp = tensor = 1`):", "", head, rule]
  for name, hw, ps in ranked:
    for label, keep in (*((r, lambda p, r=r: p.cfg.remat == r) for r in scaling.REMATS),
                        ("data only", lambda p: p.mesh[1] == p.mesh[2] == 1)):
      hit = next((p for p in ps if keep(p)), None)
      out.append(_plan_row(name, hw, hit, efficiency) if hit else
                 f"| {name} | {hw.name} | {label}: nothing fits |" + " |" * 8)
  return "\n".join(out) + "\n"


def cpu(args) -> dict:
  """The calculator beside a compiled step measured on this machine's one CPU device."""
  from benchmarks import train_step
  from gamejax import sharding
  cfg = common.model_config(args)
  mesh = sharding.make_mesh()
  peak = common.matmul_peak_flops()
  host = scaling.Hardware("this CPU", 1, peak, 0.0, 1.0, 1.0)
  out = {"benchmark": "scaling_cpu", **common.device_info(),
         "params": lm.param_count(cfg), "batch": args.batch, "seq_len": args.seq_len,
         "matmul_peak_flops_per_s": peak, "settings": {}}
  for name, accumulate in (("baseline", 1), ("accum4", 4)):
    measured = train_step.measure(cfg, accumulate, args, mesh, peak)
    plan = scaling.Plan(cfg, args.batch, args.seq_len, (1, 1, 1), accumulate)
    m = scaling.memory(plan)
    floor = scaling.step_time(plan, host, efficiency=1.0)["compute"]
    estimated_temp = m["grads"] + m["grad_accumulator"] + m["activations"]
    out["settings"][name] = {
        "predicted_compute_floor_s": floor, "measured_step_s": measured["seconds_per_step"],
        "measured_mfu": measured["mfu"],
        "estimated_state_bytes": m["params"] + m["opt_state"],
        "xla_argument_bytes": measured["argument_bytes"],
        "estimated_activation_bytes": m["activations"],
        "estimated_temp_bytes": estimated_temp, "xla_temp_bytes": measured["temp_bytes"],
        "estimated_over_xla_temp": estimated_temp / measured["temp_bytes"]}
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--markdown", action="store_true", help="print docs/scaling.md's tables")
  p.add_argument("--efficiency", type=float, default=scaling.ASSUMED_EFFICIENCY,
                 help="fraction of peak the executed FLOPs run at (an assumption)")
  p.add_argument("--cpu", action="store_true",
                 help="measure the compiled step on this CPU and compare (model flags apply)")
  p.add_argument("--batch", type=int, default=None,
                 help="global sequences per update (default 256; --cpu: 8)")
  p.add_argument("--seq_len", type=int, default=None, help="default 4096 (--cpu: 256)")
  p.add_argument("--steps", type=int, default=2, help="--cpu: timed calls per setting")
  p.add_argument("--no_hugepages", action="store_true",
                 help="--cpu: keep 4 KiB pages for malloc (as benchmarks.train_step)")
  common.add_model_flags(p)
  args = p.parse_args(argv)
  if args.cpu:
    if argv is None and not args.no_hugepages:
      hostenv.reexec_with_malloc_hugepages()
    args.batch = args.batch or 8
    args.seq_len = args.seq_len or 256
    print(json.dumps(cpu(args)))
    return
  batch, seq_len = args.batch or 256, args.seq_len or 4096
  if args.markdown:
    print(markdown(batch, seq_len, args.efficiency), end="")
    return
  for name, hw, ps in plans(batch, seq_len, args.efficiency):
    row = scaling.report(ps[0], hw, args.efficiency) if ps else {"hardware": hw.name,
                                                                   "fits": False}
    print(json.dumps({"model": name, **row}))


if __name__ == "__main__":
  main()
