"""Checkpoints of other libraries in and out: Hugging Face directories (``hf``) and GGUF files
(``gguf``). A checkpoint is named ``"hf:DIR"`` or ``"gguf:FILE"`` where a learner's ``init_from``
or ``pretrained_model(checkpoint)`` takes one."""
from __future__ import annotations

from typing import Any

PREFIXES = ("hf:", "gguf:")


def is_checkpoint(spec) -> bool:
  return isinstance(spec, str) and spec.startswith(PREFIXES)


def _reader(spec: str):
  """``(module, path)`` of checkpoint ``spec``: ``gamejax.interop.hf`` or ``.gguf``."""
  kind, _, path = spec.partition(":")
  if kind == "hf":
    from gamejax.interop import hf
    return hf, path
  if kind == "gguf":
    from gamejax.interop import gguf
    return gguf, path
  raise ValueError(f"{spec!r}: a checkpoint is 'hf:DIR' or 'gguf:FILE'")


def checkpoint_config(spec: str, **overrides):
  """The model config of checkpoint ``spec`` (reads only its config or metadata)."""
  module, path = _reader(spec)
  return module.model_config(path, **overrides)[1]


def load_checkpoint(spec: str, mesh=None, **overrides) -> tuple[Any, dict]:
  """``(config, params)`` of checkpoint ``spec`` (with a ``mesh``: each tensor put straight into
  its FSDP sharding as it is read)."""
  module, path = _reader(spec)
  return module.load(path, mesh=mesh, **overrides)
