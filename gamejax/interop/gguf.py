"""GGUF files (llama.cpp) in: metadata to the family's config, tensors dequantised by the ``gguf``
package into HF's layout (llama.cpp's q/k row permutation undone) and then read as an HF
checkpoint is (``gamejax.interop.hf.assemble``: every tensor expected, nothing extra, shapes
checked, names given on error)."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from gamejax.interop.hf import CheckpointFormatError, assemble, sharded
from gamejax.models import families


def _reader(path: str):
  from gguf import GGUFReader
  if not os.path.isfile(path):
    raise CheckpointFormatError(f"{path}: no such GGUF file")
  try:
    return GGUFReader(path)
  except Exception as e:            # a truncated or foreign file fails inside the reader
    raise CheckpointFormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") \
        from None


def metadata(reader) -> dict[str, Any]:
  """The file's key-value metadata (arrays of strings and numbers as lists)."""
  out = {}
  for key, field in reader.fields.items():
    if key.startswith("GGUF."):
      continue
    try:
      out[key] = field.contents()
    except Exception:               # a field type this gguf version cannot decode
      continue
  return out


def model_config(path: str, reader=None, **overrides):
  """``(family, config)`` of a GGUF file, from its metadata and tensor names."""
  reader = reader or _reader(path)
  meta = metadata(reader)
  arch = meta.get("general.architecture")
  try:
    family = families.for_gguf_architecture(arch, path)
  except ValueError as e:
    raise CheckpointFormatError(str(e)) from None
  tied = "output.weight" not in {t.name for t in reader.tensors}
  try:
    return family, family.config_from_gguf(meta, tied=tied, **overrides)
  except ValueError as e:
    raise CheckpointFormatError(f"{path}: {e}") from None


def load(path: str, mesh=None, **overrides) -> tuple[Any, dict]:
  """``(config, params)`` of a GGUF file, dequantised to float32 and stored in
  ``config.param_dtype``; with a ``mesh``, each tensor goes into its sharding as it is
  dequantised (``hf.sharded``)."""
  from gguf.quants import dequantize
  reader = _reader(path)
  family, cfg = model_config(path, reader, **overrides)
  by_name = {t.name: t for t in reader.tensors}
  gguf_names = {t.name: family.gguf_name(t.name) for t in family.hf_tensors(cfg)}  # HF -> GGUF
  expected = set(gguf_names.values())
  extra = sorted(n for n in by_name if n not in expected)
  if extra:
    raise CheckpointFormatError(f"{path}: tensor {extra[0]!r} is not a parameter of "
                                f"{type(cfg).__name__} (and {len(extra) - 1} more unexpected)")
  files = {hf_name: f"{path} ({gguf_name})" for hf_name, gguf_name in gguf_names.items()
           if gguf_name in by_name}

  def read(hf_name):
    gguf_name = gguf_names[hf_name]
    t = by_name[gguf_name]
    try:
      x = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
    except Exception as e:
      raise CheckpointFormatError(f"{path}: tensor {gguf_name!r} ({t.tensor_type.name}) cannot "
                                  f"be dequantised ({e})") from None
    return family.from_gguf_layout(cfg, hf_name, x)

  return cfg, assemble(family, cfg, files, read, path, sharded(mesh))
