"""Model families by name: each a module under ``gamejax/models/`` with its config class (``Config``), its
forward passes and its Hugging Face names (``HF_ARCHITECTURES``, ``hf_tensors``,
``config_from_hf``, ``config_to_hf``). Adding a family is one file and one line here."""
from __future__ import annotations

import types

from gamejax.models import llama

FAMILIES: dict[str, types.ModuleType] = {"llama": llama}


def for_hf_architecture(architecture: str | None, where: str = "config.json") -> types.ModuleType:
  """The family that reads ``architecture`` (an HF ``architectures`` entry); a ValueError lists
  the supported ones."""
  for family in FAMILIES.values():
    if architecture in family.HF_ARCHITECTURES:
      return family
  supported = sorted(a for f in FAMILIES.values() for a in f.HF_ARCHITECTURES)
  raise ValueError(f"{where}: architecture {architecture!r} is not supported; supported: "
                   f"{supported}")


def of_config(cfg) -> types.ModuleType:
  """The family whose config class ``cfg`` is an instance of."""
  for family in FAMILIES.values():
    if isinstance(cfg, family.Config):
      return family
  raise ValueError(f"no model family has the config class {type(cfg).__name__}")
