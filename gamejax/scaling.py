"""Training at scale on paper: per-device memory, step time and the best mesh of a Llama-style
model on many accelerators, from the counts gamejax itself reports.

Nothing here is a formula for what gamejax already knows:

- parameters and FLOPs are ``lm.param_count`` and ``lm.flops_per_token`` (forward + backward:
  6 x matmul params + causal attention); rematerialisation's extra forward is those counts'
  forward third (``executed_flops``);
- parameter, gradient and optimizer-state bytes per device are read off the abstract params
  (``jax.eval_shape`` of ``lm.init_params``) and the abstract state of gamejax's own AdamW
  (``run.schema.Optimizer``), each array split as ``sharding.param_specs`` /
  ``sharding.mirrored_specs`` split it on the real mesh: exact, the bytes a device holds.

What is estimated, with the formulas in each function's docstring: activations (what gamejax's
kernels keep for the backward pass, ``activation_bytes``), communication (ring collectives at a
stated bandwidth, ``communication_seconds``) and compute time (executed FLOPs at an assumed
fraction of the chip's peak, ``ASSUMED_EFFICIENCY``). ``best_plan`` searches the factorisations
of the device count into ``data x fsdp x tensor`` meshes, remat policies and gradient
accumulation for the fastest estimate whose memory fits. ``python -m benchmarks.scaling`` prints
the plans for a 1B and an 8B model on a TPU v5e-256 and on 8 x H100 (``docs/scaling.md``).

>>> from gamejax.models.llama import LlamaConfig
>>> cfg = LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
>>> lm.param_count(cfg), state_bytes(cfg, {"data": 8, "fsdp": 1, "tensor": 1})["params"]
(20640, 82560)
>>> state_bytes(cfg, {"data": 1, "fsdp": 4, "tensor": 2})["params"]  # weights / 8, norms / 4
10400
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import numpy as np

from gamejax import sharding
from gamejax.models import kernels, lm
from gamejax.models.llama import LlamaConfig

MeshShape = Mapping[str, int]

# Compute time = executed FLOPs / (peak x this): the fraction of the chip's peak the step's
# matmuls are assumed to reach. An assumption: nothing here measured it on a TPU or a GPU.
ASSUMED_EFFICIENCY = 0.4
# The share of a device's memory a plan may fill (the rest: XLA's workspace, fragmentation).
USABLE_MEMORY = 0.9
REMATS = ("none", "dots", "full")


@dataclasses.dataclass(frozen=True)
class Hardware:
  """One kind of accelerator, ``devices`` of them. ``link_bytes_per_s``: the one-way bandwidth
  one device drives into one ring collective (``communication_seconds``)."""
  name: str
  devices: int
  peak_flops_per_s: float        # per device, dense, in the compute dtype
  memory_bytes: float            # per device (HBM)
  memory_bytes_per_s: float      # HBM bandwidth
  link_bytes_per_s: float
  source: str = ""


# https://cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, inter-chip
# interconnect 400 GB/s bidirectional per chip over 4 ports (1600 Gbps), a 16 x 16 2D torus. A
# ring along one torus dimension uses 2 of the 4 ports: 100 GB/s one way.
TPU_V5E_256 = Hardware("TPU v5e-256", 256, 197e12, 16e9, 819e9, 100e9,
                       "https://cloud.google.com/tpu/docs/v5e")
# NVIDIA H100 SXM5 datasheet (https://www.nvidia.com/en-us/data-center/h100/): BF16 tensor core
# 1,979 TFLOP/s with 2:4 sparsity, so 989 dense; 80 GB HBM3 at 3.35 TB/s; NVLink 900 GB/s
# bidirectional through NVSwitch: 450 GB/s one way.
H100_X8 = Hardware("8 x H100 SXM", 8, 989e12, 80e9, 3.35e12, 450e9,
                   "https://www.nvidia.com/en-us/data-center/h100/")

# Llama 3.2 1B and Llama 3.1 8B sizes (their HF config.json), in gamejax's LlamaConfig: bf16
# compute on float32 master params (what ``LlamaConfig.dtype="bfloat16"`` runs).
LLAMA_1B = LlamaConfig(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                       d_ff=8192, tie_embeddings=True, dtype="bfloat16")
LLAMA_8B = LlamaConfig(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                       d_ff=14336, tie_embeddings=False, dtype="bfloat16")


@dataclasses.dataclass(frozen=True)
class Plan:
  """One training setup: the model (its ``dtype``, ``param_dtype`` and ``remat`` included),
  ``batch`` global sequences of ``seq_len`` tokens per update on a ``data x fsdp x tensor`` mesh,
  each update accumulated over ``grad_accumulation`` microbatches (``Stage.grad_accumulation``),
  AdamW's state in ``state_dtype`` (``Optimizer.state_dtype``; None: the params')."""
  cfg: LlamaConfig
  batch: int
  seq_len: int
  mesh: tuple[int, int, int]
  grad_accumulation: int = 1
  state_dtype: str | None = None

  @property
  def mesh_shape(self) -> dict[str, int]:
    return dict(zip(sharding.AXES, self.mesh))

  @property
  def rows_per_microbatch(self) -> int:
    """Sequences one device holds in one microbatch (rows split over ``data x fsdp``)."""
    return self.batch // (self.mesh[0] * self.mesh[1] * self.grad_accumulation)


# ---- exact: what a device holds of the params and the optimizer state ----------------------------

def abstract_params(cfg: LlamaConfig) -> Any:
  """The params tree of ``cfg`` as shapes and dtypes (nothing allocated; remat and the compute
  dtype do not change it)."""
  return _abstract_params(_storage_config(cfg))


def abstract_opt_state(cfg: LlamaConfig, state_dtype: str | None = None) -> Any:
  """The state of gamejax's AdamW (``run.schema.Optimizer``) for ``cfg``'s params, abstract."""
  return _abstract_opt_state(_storage_config(cfg), state_dtype)


def _storage_config(cfg: LlamaConfig) -> LlamaConfig:
  return dataclasses.replace(cfg, remat="none", dtype="float32")


@functools.cache
def _abstract_params(cfg: LlamaConfig) -> Any:
  return jax.eval_shape(lambda: lm.init_params(cfg, jax.random.key(0)))


@functools.cache
def _abstract_opt_state(cfg: LlamaConfig, state_dtype: str | None) -> Any:
  from gamejax.run import schema
  opt = schema.Optimizer(state_dtype=state_dtype).build(total_steps=100)
  return jax.eval_shape(opt.init, _abstract_params(cfg))


def device_bytes(tree: Any, specs: Any, mesh_shape: MeshShape) -> int:
  """Bytes one device holds of ``tree`` split by ``specs``: each dimension divided by the sizes
  of the mesh axes its spec names (the specs divide exactly: ``sharding.param_spec_at`` checks)."""
  def one(x, spec) -> int:
    shape = list(x.shape)
    for d, axes in enumerate(tuple(spec)):
      for a in (() if axes is None else (axes,) if isinstance(axes, str) else axes):
        shape[d] //= mesh_shape[a]
    return math.prod(shape) * np.dtype(x.dtype).itemsize
  leaves = jax.tree.leaves(tree)
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  return int(sum(one(x, s) for x, s in zip(leaves, spec_leaves)))


def state_bytes(cfg: LlamaConfig, mesh_shape: MeshShape, state_dtype: str | None = None
                ) -> dict[str, int]:
  """Bytes per device of the params, of AdamW's state (``mu``, ``nu`` and its counts) and of one
  set of gradients (the params' shapes, dtypes and shardings), as gamejax shards them on
  ``mesh_shape``. A ``sharding.ShardingError`` when a dimension does not divide over the mesh.

  Also ``gathered_params``: what one device holds of the largest decoder block and of the
  embedding and LM head once gathered over ``fsdp`` (the params at ``fsdp=1``), the transient
  working set FSDP adds while a layer runs. (The weights a block multiplies as one GEMM are
  stored as one, ``llama.fused_storage``: no step concatenates them into copies.)"""
  mesh = tuple(int(mesh_shape.get(a, 1)) for a in sharding.AXES)
  return dict(_state_bytes(_storage_config(cfg), mesh, state_dtype))


@functools.cache
def _state_bytes(cfg: LlamaConfig, mesh: tuple[int, int, int], state_dtype: str | None
                 ) -> tuple[tuple[str, int], ...]:
  mesh_shape = dict(zip(sharding.AXES, mesh))
  params = abstract_params(cfg)
  opt = abstract_opt_state(cfg, state_dtype)
  specs = sharding.param_specs(params, mesh_shape)
  held = device_bytes(params, specs, mesh_shape)
  unsharded_fsdp = dict(mesh_shape, fsdp=1)
  gathered = 0
  if mesh_shape.get("fsdp", 1) > 1:
    full = {k: device_bytes(v, sharding.param_specs({k: v}, unsharded_fsdp)[k], unsharded_fsdp)
            for k, v in params.items()}
    blocks = [b for k, b in full.items() if k.startswith("block_")]
    gathered = max(blocks, default=0) + sum(b for k, b in full.items()
                                            if k in ("embedding", "lm_head"))
  return (("params", held), ("grads", held),
          ("opt_state", device_bytes(opt, sharding.mirrored_specs(opt, params, mesh_shape),
                                     mesh_shape)),
          ("gathered_params", gathered))


# ---- estimated: activations ---------------------------------------------------------------------

def attention_keys_per_query(seq_len: int) -> float:
  """Keys per query whose probabilities gamejax's attention keeps for its backward, on average:
  ``kernels.self_attention`` computes query blocks of ``kernels.ATTENTION_BLOCK`` steps, block
  ``[t0, t1)`` against keys ``< t1``, and saves each block's float32 ``[queries, t1]``
  probabilities (no flash attention): ``sum((t1 - t0) * t1) / seq_len``, about
  ``seq_len / 2 + ATTENTION_BLOCK / 2``.

  >>> attention_keys_per_query(64), attention_keys_per_query(256)
  (64.0, 160.0)
  """
  b = kernels.ATTENTION_BLOCK
  blocks = [(t0, min(t0 + b, seq_len)) for t0 in range(0, seq_len, b)]
  return sum((t1 - t0) * t1 for t0, t1 in blocks) / seq_len


def layer_bytes_per_token(cfg: LlamaConfig, seq_len: int, tensor: int) -> dict[str, float]:
  """Bytes one decoder block keeps per token for its backward pass on one device, by what
  gamejax's kernels save (``c``: the compute dtype's bytes; heads and the MLP hidden split over
  ``tensor``, the residual stream not):

  - ``none``: the two RMSNorms' float32 inputs and their outputs (the matmuls' inputs),
    ``2 D (4 + c)``; q, k, v after RoPE, ``(H + 2G) K c``; attention's output head-major and
    merged (``wo``'s input), ``2 H K c``; the probabilities, ``H keys_per_query 4`` and
    ``1 / rowsum``, ``4 H``; SwiGLU's ``[gate | up]`` input and ``w_down``'s input, ``3 F c``;
  - ``dots``: the block's input and its weight matmuls' outputs (``kernels.DENSE_OUTPUT``):
    ``D c + (H + 2G) K c + D c + 2 F c + D c``;
  - ``full``: the block's input, ``D c``.

  GQA kv heads fewer than ``tensor`` are replicated, as ``sharding`` replicates their weights."""
  c = np.dtype(cfg.dtype).itemsize
  d, h, g, k, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
  kv_split = tensor if g % tensor == 0 else 1
  qkv = (h * k / tensor + 2 * g * k / kv_split) * c
  none = (2 * d * (4 + c) + qkv + 2 * h * k * c / tensor
          + h / tensor * (attention_keys_per_query(seq_len) + 1) * 4 + 3 * f * c / tensor)
  return {"none": none, "dots": 3 * d * c + qkv + 2 * f * c / tensor, "full": d * c}


def activation_bytes(cfg: LlamaConfig, rows: int, seq_len: int, tensor: int) -> float:
  """Bytes of activations live at the peak of one microbatch's backward on one device (``rows``
  sequences of ``seq_len``): every block's kept bytes (``layer_bytes_per_token`` under
  ``cfg.remat``); the gradients of one block's activations while its backward runs (one block's
  ``none`` bytes), and with remat that block's recomputed activations (as many again); and the
  trunk's ends: the embedding's output ``D c``, the final norm ``D (4 + c)``, float32 logits and
  their softmax ``2 V 4`` (vocabulary split over ``tensor``) per token, and the ``[T, T]``
  float32 mask every layer reads, ``4 T`` per token."""
  per = layer_bytes_per_token(cfg, seq_len, tensor)
  c = np.dtype(cfg.dtype).itemsize
  working = per["none"] * (1 if cfg.remat == "none" else 2)
  layers = cfg.n_layers * per[cfg.remat] + working
  ends = cfg.d_model * c + cfg.d_model * (4 + c) + 2 * cfg.vocab_size * 4 / tensor + 4 * seq_len
  return rows * seq_len * (layers + ends)


def memory(plan: Plan) -> dict[str, float]:
  """Bytes per device: params, AdamW state and gradients as sharded (``state_bytes``), the
  float32 accumulator of ``grad_accumulation > 1`` (``step.loss_and_grads``), FSDP's gathered
  working set and one microbatch's activations (``activation_bytes``); ``total``
  their sum."""
  held = state_bytes(plan.cfg, plan.mesh_shape, plan.state_dtype)
  itemsize = np.dtype(plan.cfg.param_dtype).itemsize
  out = {"params": held["params"], "opt_state": held["opt_state"], "grads": held["grads"],
         "grad_accumulator": (held["params"] * max(4, itemsize) // itemsize
                              if plan.grad_accumulation > 1 else 0),
         "gathered_params": held["gathered_params"],
         "activations": activation_bytes(plan.cfg, plan.rows_per_microbatch, plan.seq_len,
                                         plan.mesh[2])}
  out["total"] = float(sum(out.values()))
  return out


# ---- estimated: time ----------------------------------------------------------------------------

def executed_flops(cfg: LlamaConfig, seq_len: int) -> float:
  """FLOPs per token a training step runs: ``lm.flops_per_token`` (the model FLOPs MFU counts)
  plus what remat recomputes: ``full`` the trunk's forward, a third of it; ``dots`` attention's
  forward, a third of ``flops_per_token - 6 x matmul_params``."""
  model = lm.flops_per_token(cfg, seq_len)
  attention = model - 6.0 * lm.matmul_params(cfg)
  return model + {"none": 0.0, "dots": attention / 3, "full": model / 3}[cfg.remat]


def communication_seconds(plan: Plan, hw: Hardware) -> dict[str, float]:
  """Seconds per update of each mesh axis's collectives, ring algorithms at
  ``hw.link_bytes_per_s`` (``n``-way all-gather or reduce-scatter of ``s`` bytes held per device:
  ``(n - 1) s``; all-reduce: twice that over ``n``), per microbatch:

  - ``fsdp`` (``f``-way): the params gathered for the forward and again for the backward, the
    gradients reduce-scattered: ``(f - 1) (2 params + grads) / bw``;
  - ``data`` (``d``-way): the gradients all-reduced, ``2 (d - 1) / d x grads / bw`` (counted for
    every microbatch: the accumulation's ``lax.scan`` sums sharded gradients);
  - ``tensor`` (``t``-way, Megatron): ``4`` all-reduces of the ``[tokens, D]`` residual per block
    (attention and MLP outputs forward, their inputs' gradients backward; ``6`` with remat
    ``full``, which reruns the forward) and ``2`` for the vocabulary-split embedding and head,
    each ``2 (t - 1) / t x tokens D c / bw``."""
  cfg, (d, f, t) = plan.cfg, plan.mesh
  held = state_bytes(cfg, plan.mesh_shape, plan.state_dtype)
  bw, n = hw.link_bytes_per_s, plan.grad_accumulation
  tokens = plan.rows_per_microbatch * plan.seq_len
  per_layer = 6 if cfg.remat == "full" else 4
  residual = tokens * cfg.d_model * np.dtype(cfg.dtype).itemsize
  return {
      "fsdp": n * (f - 1) * (2 * held["params"] + held["grads"]) / bw,
      "data": n * 2 * (d - 1) / d * held["grads"] / bw,
      "tensor": n * (per_layer * cfg.n_layers + 2) * 2 * (t - 1) / t * residual / bw,
  }


def step_time(plan: Plan, hw: Hardware, efficiency: float = ASSUMED_EFFICIENCY
              ) -> dict[str, float]:
  """Seconds per update and what they are made of:

  - ``compute``: executed FLOPs of the global batch over ``hw.devices`` at ``efficiency`` x peak;
  - ``fsdp`` and ``data`` collectives overlap the compute (XLA schedules them beside the layers'
    matmuls), ``tensor`` ones sit between the matmuls that need them and do not;
  - ``optimizer``: AdamW reads and writes the params and its state and reads the gradients, bound
    by HBM bandwidth, after the backward;

  ``step = max(compute, fsdp + data) + tensor + optimizer``; ``tokens_per_s`` and the ``mfu`` the
  estimate implies (model FLOPs, without remat's, over the peak)."""
  tokens = plan.batch * plan.seq_len
  compute = executed_flops(plan.cfg, plan.seq_len) * tokens / (
      hw.devices * hw.peak_flops_per_s * efficiency)
  comm = communication_seconds(plan, hw)
  held = state_bytes(plan.cfg, plan.mesh_shape, plan.state_dtype)
  optimizer = (2 * (held["params"] + held["opt_state"]) + held["grads"]) / hw.memory_bytes_per_s
  step = max(compute, comm["fsdp"] + comm["data"]) + comm["tensor"] + optimizer
  model = lm.flops_per_token(plan.cfg, plan.seq_len) * tokens
  return {"compute": compute, **{f"comm_{k}": v for k, v in comm.items()},
          "optimizer": optimizer, "step": step, "tokens_per_s": tokens / step,
          "mfu": model / (step * hw.devices * hw.peak_flops_per_s)}


# ---- the search ---------------------------------------------------------------------------------

def meshes(devices: int) -> list[tuple[int, int, int]]:
  """Every ``(data, fsdp, tensor)`` whose product is ``devices``.

  >>> meshes(4)
  [(1, 1, 4), (1, 2, 2), (1, 4, 1), (2, 1, 2), (2, 2, 1), (4, 1, 1)]
  """
  divisors = [n for n in range(1, devices + 1) if devices % n == 0]
  return [(d, f, devices // (d * f)) for d in divisors for f in divisors
          if devices % (d * f) == 0]


def candidates(cfg: LlamaConfig, batch: int, seq_len: int, devices: int,
               state_dtype: str | None = None, remats=REMATS) -> list[Plan]:
  """Every plan on ``devices``: the meshes whose params divide (``sharding.check_params``) and
  whose batch shards divide ``batch``, each remat policy, each accumulation that divides a
  shard's rows."""
  out = []
  for mesh in meshes(devices):
    try:
      sharding.check_params(abstract_params(cfg), dict(zip(sharding.AXES, mesh)))
    except sharding.ShardingError:
      continue
    shards = mesh[0] * mesh[1]
    if batch % shards:
      continue
    rows = batch // shards
    for remat in remats:
      for n in (n for n in range(1, rows + 1) if rows % n == 0):
        out.append(Plan(dataclasses.replace(cfg, remat=remat), batch, seq_len, mesh, n,
                        state_dtype))
  return out


def fits(plan: Plan, hw: Hardware, usable: float = USABLE_MEMORY) -> bool:
  return memory(plan)["total"] <= usable * hw.memory_bytes


def ranked(cfg: LlamaConfig, batch: int, seq_len: int, hw: Hardware,
           state_dtype: str | None = None, efficiency: float = ASSUMED_EFFICIENCY,
           usable: float = USABLE_MEMORY) -> list[Plan]:
  """The ``candidates`` whose ``memory`` fits in ``usable`` x the device's, fastest ``step_time``
  first; among equally fast ones (compute-bound plans whose collectives hide behind the matmuls)
  the one that moves the fewest bytes between devices (fewer microbatches: fewer gathers) first,
  then the one with the least memory."""
  scored = []
  for i, p in enumerate(candidates(cfg, batch, seq_len, hw.devices, state_dtype)):
    total = memory(p)["total"]
    if total <= usable * hw.memory_bytes:
      t = step_time(p, hw, efficiency)
      comm = t["comm_fsdp"] + t["comm_data"] + t["comm_tensor"]
      scored.append((round(t["step"], 9), comm, total, i, p))
  return [s[-1] for s in sorted(scored)]


def best_plan(cfg: LlamaConfig, batch: int, seq_len: int, hw: Hardware,
              state_dtype: str | None = None, efficiency: float = ASSUMED_EFFICIENCY,
              usable: float = USABLE_MEMORY) -> Plan | None:
  """The first of ``ranked``: the fastest plan that fits; None when none fits.

  >>> cfg = LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
  >>> plan = best_plan(cfg, batch=8, seq_len=16, hw=H100_X8)
  >>> plan.mesh, fits(plan, H100_X8)
  ((4, 1, 2), True)
  >>> best_plan(cfg, batch=8, seq_len=16, hw=dataclasses.replace(H100_X8, memory_bytes=1e4))
  """
  plans = ranked(cfg, batch, seq_len, hw, state_dtype, efficiency, usable)
  return plans[0] if plans else None


def report(plan: Plan, hw: Hardware, efficiency: float = ASSUMED_EFFICIENCY) -> dict:
  """Everything about ``plan`` on ``hw`` as plain data (bytes, seconds, FLOPs)."""
  mem = memory(plan)
  return {"hardware": hw.name, "devices": hw.devices,
          "params": lm.param_count(plan.cfg),
          "flops_per_token": lm.flops_per_token(plan.cfg, plan.seq_len),
          "executed_flops_per_token": executed_flops(plan.cfg, plan.seq_len),
          "batch": plan.batch, "seq_len": plan.seq_len,
          "tokens_per_step": plan.batch * plan.seq_len,
          "model_flops_per_step": lm.flops_per_token(plan.cfg, plan.seq_len)
                                  * plan.batch * plan.seq_len,
          "mesh": plan.mesh_shape, "remat": plan.cfg.remat,
          "grad_accumulation": plan.grad_accumulation,
          "rows_per_microbatch": plan.rows_per_microbatch,
          "dtype": plan.cfg.dtype, "param_dtype": plan.cfg.param_dtype,
          "state_dtype": plan.state_dtype or plan.cfg.param_dtype,
          "memory_bytes": mem, "memory_fraction": mem["total"] / hw.memory_bytes,
          "fits": mem["total"] <= USABLE_MEMORY * hw.memory_bytes,
          "seconds": step_time(plan, hw, efficiency), "efficiency": efficiency}
