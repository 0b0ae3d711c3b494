"""Model families: each a module under ``gamejax/models/`` that defines ``Config`` (its frozen config
dataclass), ``HF_ARCHITECTURES`` and the family interface that ``gamejax.models.lm`` dispatches
to (``init_params``, ``apply``, ``hidden``, ``lm_head``, ``init_cache``, ``apply_with_cache``,
``param_count``, ``matmul_params``, ``flops_per_token``) with its Hugging Face names
(``hf_tensors``, ``config_from_hf``, ``config_to_hf``) and optionally its GGUF names
(``GGUF_ARCHITECTURE``, ``gguf_name``, ``from_gguf_layout``, ``config_from_gguf``) and
``decode_params`` (params prepared for a decode loop; ``lm.decode_params``), ``rope_tables``
(RoPE's tables, computed ahead of a decode loop; ``lm.rope_tables``) and
``fused_storage`` (weights stored as one leaf; ``lm.fused_storage``, ``gamejax.models.fusion``).

Families are found by looking: adding one is adding its file, nothing else.

>>> sorted(FAMILIES())[:2]
['gpt2', 'llama']
>>> of_config(FAMILIES()["qwen2"].Config()).__name__
'gamejax.models.qwen2'
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
import types

import gamejax.models

# The names a module needs to be a family.
INTERFACE = ("Config", "HF_ARCHITECTURES", "init_params", "apply", "hidden", "lm_head",
             "init_cache", "apply_with_cache", "param_count", "matmul_params", "flops_per_token",
             "hf_tensors", "config_from_hf", "config_to_hf")


@functools.cache
def FAMILIES() -> dict[str, types.ModuleType]:  # noqa: N802 (a constant, computed once)
  """Family name (its module's name) -> module, for every module of ``gamejax.models`` that has
  the whole interface."""
  out = {}
  for info in pkgutil.iter_modules(gamejax.models.__path__):
    module = importlib.import_module(f"gamejax.models.{info.name}")
    if all(hasattr(module, name) for name in INTERFACE):
      out[info.name] = module
  return out


def configs() -> list[type]:
  """Every family's config class."""
  return [family.Config for family in FAMILIES().values()]


def for_hf_architecture(architecture: str | None, where: str = "config.json") -> types.ModuleType:
  """The family that reads ``architecture`` (an HF ``architectures`` entry); a ValueError lists
  the supported ones."""
  for family in FAMILIES().values():
    if architecture in family.HF_ARCHITECTURES:
      return family
  supported = sorted(a for f in FAMILIES().values() for a in f.HF_ARCHITECTURES)
  raise ValueError(f"{where}: architecture {architecture!r} is not supported; supported: "
                   f"{supported}")


def for_gguf_architecture(architecture: str | None, where: str) -> types.ModuleType:
  """The family that reads GGUF ``general.architecture``; a ValueError lists the supported ones."""
  readable = {f.GGUF_ARCHITECTURE: f for f in FAMILIES().values() if hasattr(f, "GGUF_ARCHITECTURE")}
  if architecture not in readable:
    raise ValueError(f"{where}: GGUF architecture {architecture!r} is not supported; supported: "
                     f"{sorted(readable)}")
  return readable[architecture]


def of_config(cfg) -> types.ModuleType:
  """The family whose config class is ``type(cfg)``."""
  for family in FAMILIES().values():
    if type(cfg) is family.Config:
      return family
  raise ValueError(f"no model family has the config class {type(cfg).__name__}; the families' "
                   f"configs are {sorted(c.__name__ for c in configs())}")
