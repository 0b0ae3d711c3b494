"""Hugging Face checkpoint directories in and out: ``config.json`` plus safetensors (one file, or
shards listed by ``model.safetensors.index.json``), mapped through the model family's names
(``gamejax.models.families``).

Reading is memory-mapped (``safetensors.safe_open``) and strict: a tensor the family does not
expect, one it expects and the files lack, or a shape that disagrees is an error naming the
tensor and its file. A tied LM head that a checkpoint ships anyway is accepted only if it equals
the embedding. Writing goes to a temporary directory renamed into place, so an interrupted
export leaves nothing half-written.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np

from gamejax.models import families, fusion, lm

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Buffers some exporters ship that are not parameters (recomputed from the config); a family adds
# its own as ``HF_NOT_PARAMETERS`` (name suffixes).
NOT_PARAMETERS = (".rotary_emb.inv_freq",)


class CheckpointFormatError(ValueError):
  """An HF directory the family cannot read: what is wrong and where (file, tensor)."""


def read_config(directory: str) -> dict:
  path = os.path.join(directory, CONFIG)
  if not os.path.isfile(path):
    raise CheckpointFormatError(f"{directory}: no {CONFIG} (not a Hugging Face model directory)")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointFormatError(f"{path}: not valid JSON ({e})") from None


def model_config(directory: str, **overrides):
  """``(family, config)`` of the HF directory (``overrides``, e.g. ``dtype``, go to the config)."""
  hf = read_config(directory)
  where = os.path.join(directory, CONFIG)
  try:
    family = families.for_hf_architecture((hf.get("architectures") or [None])[0], where)
    return family, family.config_from_hf(hf, **overrides)
  except ValueError as e:
    raise CheckpointFormatError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None


def _tensor_files(directory: str) -> dict[str, str]:
  """Tensor name -> the safetensors file that holds it."""
  index = os.path.join(directory, INDEX)
  if os.path.isfile(index):
    try:
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise CheckpointFormatError(f"{index}: no readable weight_map ({e!r})") from None
    return {name: os.path.join(directory, file) for name, file in weight_map.items()}
  single = os.path.join(directory, SINGLE)
  if not os.path.isfile(single):
    raise CheckpointFormatError(f"{directory}: neither {SINGLE} nor {INDEX}")
  return {name: single for name in _open(single).keys()}


def _open(path: str, framework: str = "flax"):
  from safetensors import safe_open
  if not os.path.isfile(path):
    raise CheckpointFormatError(f"{path}: missing (listed in {INDEX})")
  try:
    return safe_open(path, framework=framework)
  except Exception as e:          # safetensors raises its own errors for a bad header
    raise CheckpointFormatError(f"{path}: not a readable safetensors file ({e})") from None


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def load(directory: str, mesh=None, **overrides) -> tuple[Any, dict]:
  """``(config, params)`` of an HF directory, params stored in ``config.param_dtype``; with a
  ``mesh``, each tensor is read (memory-mapped), laid out on the host and put straight into its
  FSDP sharding on the mesh, one tensor at a time (``sharded``)."""
  family, cfg = model_config(directory, **overrides)
  files = _tensor_files(directory)
  handles: dict[str, Any] = {}

  def read(name):
    path = files[name]
    if path not in handles:
      handles[path] = _open(path, "flax" if mesh is None else "numpy")
    try:
      return handles[path].get_tensor(name)
    except Exception as e:
      raise CheckpointFormatError(f"{path}: tensor {name!r} cannot be read ({e})") from None

  return cfg, assemble(family, cfg, files, read, directory, sharded(mesh))


def sharded(mesh) -> Callable[[tuple, Any], Any] | None:
  """``place(path, host_array)``: the array put into its sharding on ``mesh`` by its logical
  axes (``gamejax.sharding.param_spec_at``), as the training state shards it; None without a
  mesh."""
  if mesh is None:
    return None
  import jax
  from jax.sharding import NamedSharding
  from gamejax.sharding import param_spec_at
  return lambda path, x: jax.device_put(
      x, NamedSharding(mesh, param_spec_at(tuple(path), x.shape, dict(mesh.shape))))


def assemble(family, cfg, files: Mapping[str, str], read: Callable[[str], Any],
             where: str, place: Callable[[tuple, Any], Any] | None = None) -> dict:
  """gamejax params of ``cfg`` from tensors under their HF names and in HF's layout: ``files``
  maps each available name to the file that holds it, ``read(name)`` gives the array. Every
  expected tensor must be there with its shape, and nothing else. ``place(path, host_array)``
  (``sharded``): each tensor is laid out on the host and placed before the next is read, so no
  more than one tensor (or the parts of one weight stored fused, ``lm.fused_storage``) is ever
  on the host; else each is laid out on the default device."""
  expected = family.hf_tensors(cfg)
  known = {t.name for t in expected}
  prefix = getattr(family, "HF_BASE_PREFIX", "")     # some exports drop the base model's prefix
  if prefix and not any(n.startswith(prefix) for n in files) and any(
      prefix + n in known for n in files):
    files = {prefix + n if prefix + n in known else n: f for n, f in files.items()}
    read = (lambda read_unprefixed: lambda name: read_unprefixed(
        name[len(prefix):] if name.startswith(prefix) else name))(read)
  buffers = NOT_PARAMETERS + tuple(getattr(family, "HF_NOT_PARAMETERS", ()))
  tied_head = "lm_head.weight" if cfg.tie_embeddings else None
  extra = sorted(n for n in files if n not in known and n != tied_head
                 and not n.endswith(buffers))
  if extra:
    raise CheckpointFormatError(f"{files[extra[0]]}: tensor {extra[0]!r} is not a parameter of "
                                f"{type(cfg).__name__} (and {len(extra) - 1} more unexpected)")
  missing = [t.name for t in expected if t.name not in files]
  if missing:
    raise CheckpointFormatError(f"{where}: tensor {missing[0]!r} is missing (and "
                                f"{len(missing) - 1} more)")
  params: dict = {}
  dtype = jnp.dtype(cfg.param_dtype)
  specs = lm.fused_storage(cfg)
  waiting: dict = {}    # a fused weight's parts read so far: stored path -> {part index: array}
  for t in expected:
    x = read(t.name)
    if tuple(x.shape) != t.hf_shape:
      raise CheckpointFormatError(f"{files[t.name]}: tensor {t.name!r} has shape "
                                  f"{tuple(x.shape)}; the config implies {t.hf_shape}")
    value = t.to_gamejax(jnp.asarray(x) if place is None else np.asarray(x)).astype(dtype)
    del x
    path, spec, i = fusion.locate(t.path, specs)
    if spec is not None:     # a part of a weight stored fused: placed once all its parts are read
      parts = waiting.setdefault(path, {})
      parts[i] = value
      if len(parts) < len(spec.parts):
        continue
      parts = waiting.pop(path)
      value = spec.join([parts[j] for j in range(len(spec.parts))])
    _set(params, path, value if place is None else place(path, value))
    del value
  if tied_head in files:
    head = read(tied_head)
    if tuple(head.shape) != tuple(params["embedding"].shape) or not bool(
        jnp.array_equal(jnp.asarray(head, dtype), params["embedding"])):
      raise CheckpointFormatError(f"{files[tied_head]}: {tied_head!r} differs from the embedding "
                                  "but config.json says tie_word_embeddings=true")
  return params


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json")


def write_tokenizer(spec: str | None, directory: str) -> None:
  """The tokenizer files of ``spec`` into ``directory``: an HF folder's (``"hf:DIR"``: copied),
  a GGUF file's (``"gguf:FILE"``: converted by transformers' GGUF reader, which must be
  installed); nothing for ``None`` or ``"byte"`` (the byte tokenizer needs no files)."""
  if spec in (None, "byte"):
    return
  kind, _, path = spec.partition(":")
  if kind == "hf":
    copied = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(path, f))]
    if "tokenizer.json" not in copied:
      raise CheckpointFormatError(f"{path}: no tokenizer.json to export with the model")
    for f in copied:
      shutil.copyfile(os.path.join(path, f), os.path.join(directory, f))
    return
  if kind == "gguf":
    try:
      from transformers import AutoTokenizer
    except ImportError:
      raise CheckpointFormatError(f"{path}: converting a GGUF file's tokenizer needs "
                                  "transformers (pip install transformers)") from None
    try:
      tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                          gguf_file=os.path.basename(path))
    except Exception as e:          # transformers' GGUF reader raises many kinds
      raise CheckpointFormatError(f"{path}: its tokenizer cannot be read ({e})") from None
    tok.save_pretrained(directory)
    return
  raise CheckpointFormatError(f"{spec!r}: a tokenizer is 'byte', 'hf:DIR' or 'gguf:FILE'")


def hf_arrays(cfg, params) -> dict:
  """Every tensor of the HF checkpoint of ``cfg`` and ``params``: HF name -> array in HF's
  layout (weights stored fused, ``lm.fused_storage``, split back into their standard parts)."""
  standard = fusion.unfuse(params, lm.fused_storage(cfg))
  return {t.name: jnp.asarray(t.to_hf(_get(standard, t.path)))
          for t in families.of_config(cfg).hf_tensors(cfg)}


def save(cfg, params, directory: str, max_shard_bytes: int = 5 * 2**30,
         tokenizer_from: str | None = None) -> None:
  """Writes ``cfg`` and ``params`` as an HF directory (``config.json`` and safetensors, sharded
  above ``max_shard_bytes`` with an index), with the tokenizer files of ``tokenizer_from``
  (``write_tokenizer``). The directory must not exist; it appears whole or not at all."""
  from safetensors.flax import save_file
  if os.path.exists(directory):
    raise FileExistsError(f"{directory} exists; choose a new directory to export to")
  tensors = hf_arrays(cfg, params)
  shards, size = [[]], 0
  for name, x in tensors.items():
    if shards[-1] and size + x.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += x.nbytes
  tmp = f"{directory.rstrip(os.sep)}.partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    names = [SINGLE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, shard in zip(names, shards):
      save_file({n: tensors[n] for n in shard}, os.path.join(tmp, file), metadata={"format": "pt"})
    if len(shards) > 1:
      index = {"metadata": {"total_size": int(sum(x.nbytes for x in tensors.values()))},
               "weight_map": {n: f for f, shard in zip(names, shards) for n in shard}}
      _write_text(os.path.join(tmp, INDEX), json.dumps(index, indent=2))
    config = families.of_config(cfg).config_to_hf(cfg)
    write_tokenizer(tokenizer_from, tmp)
    if os.path.isfile(os.path.join(tmp, "tokenizer.json")):
      # The tokenizer's special ids, so that transformers' generate stops where gamejax does.
      from gamejax.data.tokenizer import HFTokenizer
      tok = HFTokenizer.from_dir(tmp)
      ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
      config.update(ids)
      _write_text(os.path.join(tmp, "generation_config.json"), json.dumps(ids, indent=2))
    _write_text(os.path.join(tmp, CONFIG), json.dumps(config, indent=2))
    os.replace(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _write_text(path: str, text: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
