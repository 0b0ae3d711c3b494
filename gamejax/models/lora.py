"""LoRA: low-rank adapters on a model's dense weights, for any family.

A target weight ``W`` gets ``W + (alpha / rank) * A @ B`` with ``A: [in, rank]`` and
``B: [rank, out]``, reshaped to ``W``'s shape. The targets are the family's dense weights (its
Hugging Face ``Linear`` and ``Conv1D`` tensors: ``hf_tensors(cfg)``'s ``dense`` ones) whose HF
name matches a regex, as PEFT's ``target_modules`` does (``"q_proj|v_proj"``, ``"c_attn"``). In
gamejax's layout a dense weight's input axes come first, so ``A @ B`` is ``W``'s delta
flattened.

A learner with adapters holds a ``LoraParams``: only the adapters are leaves (what is
differentiated, what the optimizer keeps state for, what checkpoints write each save); the base
is the frozen player named by ``LoraParams.base`` (``state.frozen[base]``, written once), and is
read through ``with_frozen(frozen)`` inside the compiled step, a traced input, never a constant. The
base is also the KL reference: at ``B = 0`` the adapted model is the base.

``A`` starts as PEFT's (Kaiming-uniform, ``a = sqrt(5)``: ``U(-1/sqrt(in), 1/sqrt(in))``) and
``B`` at 0, so training starts from the base model exactly.

>>> import jax
>>> from gamejax.models.llama import LlamaConfig, init_params
>>> cfg = LlamaConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)
>>> lcfg = LoraConfig(rank=4, alpha=8.0, targets="q_proj|v_proj")
>>> [t.name for t in targets(cfg, lcfg)]
['model.layers.0.self_attn.q_proj.weight', 'model.layers.0.self_attn.v_proj.weight']
>>> lora = init(cfg, lcfg, jax.random.key(0), base="agent/base")
>>> lora.adapters["block_0"]["attn"]["wq"]["a"].shape, lora.adapters["block_0"]["attn"]["wq"]["b"].shape
((16, 4), (4, 16))
>>> base = init_params(cfg, jax.random.key(1))
>>> merged = lora.with_frozen({"agent/base": base})
>>> bool((merged["block_0"]["attn"]["wqkv"] == base["block_0"]["attn"]["wqkv"]).all())  # B = 0
True
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gamejax.models import families, fusion, kernels, lm

Params = Any


class LoraConfigError(ValueError):
  """A LoRA setting that cannot be applied to the model (bad rank, a regex matching nothing)."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Adapter rank, ``alpha`` (the delta is scaled by ``alpha / rank``) and ``targets``: a regex
  searched in the family's HF names of its dense weights (``q_proj``, ``mlp.down_proj``,
  ``c_attn``, ...). ``merged``: the training forward reads the adapted weights formed (``W +
  s A B``), whose backward forms each targeted weight's whole gradient; by default it reads them
  low-rank (``kernels.LowRank``, ``x W + s (x A) B``), which is faster and rounds differently
  (runs made before the low-rank forward are reproduced with ``merged = True``)."""
  rank: int = 8
  alpha: float = 16.0
  targets: str = "q_proj|k_proj|v_proj|o_proj"
  merged: bool = False

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
      raise LoraConfigError(f"LoraConfig.rank={self.rank!r} must be a positive integer")
    if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
      raise LoraConfigError(f"LoraConfig.alpha={self.alpha!r} must be a positive number")
    try:
      re.compile(self.targets)
    except (re.error, TypeError) as e:
      raise LoraConfigError(f"LoraConfig.targets={self.targets!r} is not a regex ({e})") from None
    if not isinstance(self.merged, bool):
      raise LoraConfigError(f"LoraConfig.merged={self.merged!r} must be True or False")

  @property
  def scale(self) -> float:
    return float(self.alpha) / self.rank


def dense_tensors(cfg) -> list:
  """The family's dense weights (HF ``Linear`` and ``Conv1D`` tensors), the possible LoRA
  targets."""
  return [t for t in families.of_config(cfg).hf_tensors(cfg) if getattr(t, "dense", t.linear)]


def targets(cfg, lcfg: LoraConfig) -> list:
  """The dense weights whose HF name matches ``lcfg.targets``; none is an error listing them."""
  dense = dense_tensors(cfg)
  found = [t for t in dense if re.search(lcfg.targets, t.name)]
  if not found:
    kinds = sorted({re.sub(r"\.\d+\.", ".N.", t.name) for t in dense})
    raise LoraConfigError(f"LoraConfig.targets={lcfg.targets!r} matches none of "
                          f"{type(cfg).__name__}'s dense weights: {kinds}")
  return found


@flax.struct.dataclass
class LoraParams:
  """A learner's adapters (``{path...: {"a": [in, r], "b": [r, out]}}`` along the standard
  layout's param paths, ``hf_tensors``' ``path``), the frozen player holding its base (``base``),
  the delta's scale, the family's weights stored fused (``lm.fused_storage``: an adapter of
  ``wq`` adds its delta to ``wq``'s part of the stored ``wqkv``) and ``LoraConfig.merged``; all
  but ``adapters`` are static (not leaves)."""
  adapters: dict
  base: str = flax.struct.field(pytree_node=False)
  scale: float = flax.struct.field(pytree_node=False)
  fused: tuple = flax.struct.field(pytree_node=False, default=())
  merged: bool = flax.struct.field(pytree_node=False, default=False)

  def with_frozen(self, frozen, low_rank: bool = False) -> Params:
    """The adapted model's params: the base (``frozen[self.base]``) with every delta added, or
    with ``low_rank`` each targeted weight a ``kernels.LowRank`` (the deltas not added: a
    training forward's, whose backward then skips the frozen weights' GEMMs; not with
    ``LoraConfig.merged``)."""
    if self.base not in frozen:
      raise KeyError(f"LoRA adapters need their base, the frozen player {self.base!r}; the "
                     f"frozen players are {sorted(frozen)}")
    return (low_rank_params if low_rank and not self.merged else merge)(frozen[self.base], self)


@flax.struct.dataclass
class Adapted:
  """A LoRA learner's starting point: its adapters and the base params they adapt (which the
  stage keeps as the frozen player ``adapters.base``)."""
  adapters: LoraParams
  base: Params


def init(cfg, lcfg: LoraConfig, rng, base: str) -> LoraParams:
  """Fresh adapters for ``cfg``'s targets (``A`` Kaiming-uniform, ``B`` zero)."""
  adapters: dict = {}
  found = targets(cfg, lcfg)
  keys = jax.random.split(rng, len(found))
  dtype = jnp.dtype(cfg.param_dtype)
  for key, t in zip(keys, found):
    fan_in, fan_out = t.in_out
    bound = 1.0 / math.sqrt(fan_in)
    node = adapters
    for part in t.path:
      node = node.setdefault(part, {})
    node["a"] = jax.random.uniform(key, (fan_in, lcfg.rank), jnp.float32, -bound, bound).astype(dtype)
    node["b"] = jnp.zeros((lcfg.rank, fan_out), dtype)
  return LoraParams(adapters=adapters, base=base, scale=lcfg.scale, fused=lm.fused_storage(cfg),
                    merged=lcfg.merged)


def _pairs(adapters: dict, prefix=()):
  """``(path, {"a", "b"})`` of every adapter in the tree."""
  if set(adapters) == {"a", "b"} and not isinstance(adapters["a"], dict):
    yield prefix, adapters
    return
  for key, sub in adapters.items():
    yield from _pairs(sub, prefix + (key,))


def _stored_low_ranks(base: Params, lora: LoraParams) -> dict:
  """``{stored path: LowRank}``: each stored weight an adapter targets, with its adapters' deltas
  on their columns of its 2-D form (a weight stored fused, ``lora.fused``, along its axis 1: one
  column range per part; ``w_gate_up [D, 2, F]``'s ``w_up`` is columns ``F .. 2F``)."""
  found: dict = {}
  for path, pair in _pairs(lora.adapters):
    stored, spec, i = fusion.locate(path, lora.fused)
    w = base
    for part in stored:
      w = w[part]
    n_out = w.size // pair["a"].shape[0]
    if spec is None:
      cols = (0, n_out)
    else:
      if spec.axis != 1 or w.shape[0] != pair["a"].shape[0]:
        raise NotImplementedError(f"LoRA on {path}: a part of {stored} fused along axis "
                                  f"{spec.axis} of {w.shape}")
      at = spec.index(i, w.ndim)[1]
      start, stop = (at.start, at.stop) if isinstance(at, slice) else (at, at + 1)
      inner = n_out // w.shape[1]
      cols = (start * inner, stop * inner)
    lr = found.get(stored, kernels.LowRank(w, (), (), (), lora.scale))
    found[stored] = dataclasses.replace(lr, a=lr.a + (pair["a"],), b=lr.b + (pair["b"],),
                                        cols=lr.cols + (cols,))
  return found


def _replace(base: Params, leaves: dict) -> Params:
  """``base`` with the leaves at ``{path: value}`` replaced (a new tree; ``base`` untouched)."""
  out = jax.tree.map(lambda x: x, base)          # a new tree of the same leaves
  for stored, value in leaves.items():
    node = out
    for part in stored[:-1]:
      node[part] = dict(node[part])
      node = node[part]
    node[stored[-1]] = value
  return out


def low_rank_params(base: Params, lora: LoraParams) -> Params:
  """The base with every targeted weight a ``kernels.LowRank``: the adapted model as a training
  forward reads it, its deltas never added to the weights (``kernels.low_rank_dense``)."""
  return _replace(base, _stored_low_ranks(base, lora))


def merge(base: Params, lora: LoraParams) -> Params:
  """The base with every adapter's delta added (``scale * A @ B`` in float32, then the base's
  dtype); a weight stored fused gets its delta on its part (``lora.fused``), the other parts
  untouched."""
  return _replace(base, {path: lr.materialize()
                         for path, lr in _stored_low_ranks(base, lora).items()})


def resolve(params, frozen) -> Params:
  """``params`` themselves, or the adapted model's when they are ``LoraParams``."""
  return params.with_frozen(frozen) if isinstance(params, LoraParams) else params


def count(lora: LoraParams) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(lora.adapters)))


# ---------------------------------------------------------------------------------------------
# PEFT's adapter format: adapter_config.json + adapter_model.safetensors.

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def peft_tensors(cfg, lora: LoraParams) -> dict[str, np.ndarray]:
  """PEFT's tensors of the adapters: ``base_model.model.<module>.lora_A.weight`` ``[r, in]``
  and ``.lora_B.weight`` ``[out, r]``."""
  by_path = {t.path: t for t in dense_tensors(cfg)}
  out = {}
  for path, pair in _pairs(lora.adapters):
    module = by_path[path].name[:-len(".weight")]
    out[f"base_model.model.{module}.lora_A.weight"] = np.asarray(pair["a"], np.float32).T.copy()
    out[f"base_model.model.{module}.lora_B.weight"] = np.asarray(pair["b"], np.float32).T.copy()
  return out


def save_peft(cfg, lcfg: LoraConfig, lora: LoraParams, directory: str,
              base_model: str = "") -> None:
  """Writes the adapters as a PEFT LoRA adapter directory (which ``PeftModel.from_pretrained``
  loads onto the base model); it appears whole or not at all."""
  from safetensors.numpy import save_file
  if os.path.exists(directory):
    raise FileExistsError(f"{directory} exists; choose a new directory to export to")
  tensors = peft_tensors(cfg, lora)
  by_path = {t.path: t for t in dense_tensors(cfg)}
  conv1d = {by_path[path].conv1d for path, _ in _pairs(lora.adapters)}
  if len(conv1d) > 1:
    raise LoraConfigError("PEFT's adapter config has one fan_in_fan_out: adapt Linear or Conv1D "
                          "weights, not both")
  # Full module names: PEFT matches a listed name exactly (or as a dotted suffix), so a regex
  # that picks some layers only exports as exactly those.
  modules = sorted({name[len("base_model.model."):-len(".lora_A.weight")]
                    for name in tensors if name.endswith(".lora_A.weight")})
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lcfg.rank,
            "lora_alpha": lcfg.alpha, "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": conv1d == {True}, "target_modules": modules,
            "base_model_name_or_path": base_model, "inference_mode": True,
            "init_lora_weights": True, "use_rslora": False, "use_dora": False}
  tmp = f"{directory.rstrip(os.sep)}.partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    save_file(tensors, os.path.join(tmp, PEFT_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(tmp, PEFT_CONFIG), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2)
    os.replace(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
