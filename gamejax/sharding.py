"""Meshes and shardings: a ``("data", "fsdp", "tensor")`` mesh, parameter shardings from logical
axis names, batch shardings.

Every parameter dimension a model family names (its ``PARAM_AXES`` table, beside its Hugging Face
name map: ``"attn/wo": ("heads", "head_dim", "embed")``) is mapped to mesh axes by one rules table,
``RULES``, Megatron-style: attention heads, the MLP hidden dimension and the vocabulary over
``tensor``; the model dimension over ``fsdp``; a batch's rows over ``data`` and ``fsdp``. The
forward passes put the same names on their activations (``gamejax.models.partitioning``).
Parameters no table names (reward and value heads, game logits, LoRA adapters, league stacks)
keep the plain FSDP rule: their largest dimension divisible by ``fsdp`` is split, the rest
replicated. Optimizer states take the sharding of the parameter they mirror (Adam's ``mu``,
``nu``), matched by path suffix and shape.

A named dimension that its axes do not divide is an error naming the parameter, except GQA's kv
heads when there are fewer of them than ``tensor`` devices: those are replicated (each device
holds every kv head; its query heads read theirs), as Megatron and vLLM do. Weights stored fused
(Llama's ``wqkv = wq | wk | wv``, ``w_gate_up``; ``gamejax.models.fusion``) are split by their
own names: ``w_gate_up [D, 2, F]`` over ``mlp``; ``wqkv [D, H + 2G, K]``'s ``qkv_heads`` in
even chunks over ``tensor`` (replicated when they do not divide). Under tensor parallelism the
forwards regroup what they read so that each device computes its own heads: Llama's q | k | v
heads by kv head (``kernels.group_qkv``: the weight moves between devices once per step, not q,
k and v; with more devices than kv heads, each device's queries with a copy of their kv head),
GPT-2's by head, SwiGLU's gate and up as two GEMMs over each device's slice of F; the
step's only activation collectives are then Megatron's all-reduces of the residual.

The same code runs on one CPU device (a 1x1x1 mesh), simulated CPU devices, a GPU or a TPU slice.

>>> mesh = make_mesh(data=1, fsdp=1)
>>> mesh.axis_names
('data', 'fsdp', 'tensor')
>>> logical_spec(("batch", "length", "embed"), (8, 16, 32), {"data": 2, "fsdp": 4, "tensor": 1})
P(('data', 'fsdp'), None, None)
>>> param_spec_at(("block_0", "attn", "wqkv"), (32, 8, 8), {"data": 1, "fsdp": 4, "tensor": 2})
P('fsdp', 'tensor', None)
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gamejax.models import partitioning

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # a batch's rows are split over these (replicated over tensor)

# Logical dimension name -> mesh axes (None: replicated). Each mesh axis splits at most one
# dimension of an array, the first that names it: a residual ("batch", "length", "embed") has its
# rows over (data, fsdp) and its embed replicated, while a weight's "embed" is split over fsdp.
RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("qkv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("length", None),
    ("head_dim", None),
    ("qkv", None),
    ("positions", None),
)
# Names that are replicated, not an error, when there are fewer of them than devices on their axes.
REPLICATE_WHEN_FEWER = ("kv_heads",)
# Names that are replicated, not an error, when their axes do not divide them: the fused q | k | v
# heads of Llama's ``wqkv`` (``H + 2G`` of them; split over ``tensor`` only to share the weight's
# memory: the forward reads it regrouped by kv head, ``kernels.group_qkv``).
REPLICATE_WHEN_UNEVEN = ("qkv_heads",)


class ShardingError(ValueError):
  """A mesh that does not fit the devices, or a parameter that does not divide over it."""


def mesh_shape(data: int = -1, fsdp: int = 1, tensor: int = 1, n_devices: int | None = None
               ) -> dict[str, int]:
  """``{"data": .., "fsdp": .., "tensor": ..}`` over ``n_devices`` (default: all); ``data=-1``
  takes what is left. A ShardingError names the settings when they do not fit.

  >>> mesh_shape(-1, 2, 2, n_devices=8)
  {'data': 2, 'fsdp': 2, 'tensor': 2}
  """
  n = jax.device_count() if n_devices is None else n_devices
  given = f"Experiment.mesh_data={data} x mesh_fsdp={fsdp} x mesh_tensor={tensor}"
  for name, v in (("mesh_fsdp", fsdp), ("mesh_tensor", tensor), ("mesh_data", data)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not (
        v >= 1 or (name == "mesh_data" and v == -1)):
      raise ShardingError(f"Experiment.{name}={v!r} must be a positive integer"
                          + (" or -1 (what is left)" if name == "mesh_data" else ""))
  if data == -1:
    if n % (fsdp * tensor):
      raise ShardingError(f"{given}: mesh_fsdp x mesh_tensor = {fsdp * tensor} does not divide "
                          f"the {n} devices")
    data = n // (fsdp * tensor)
  if data * fsdp * tensor != n:
    raise ShardingError(f"{given} = {data * fsdp * tensor}, but there are {n} devices")
  return {"data": int(data), "fsdp": int(fsdp), "tensor": int(tensor)}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """A ``data x fsdp x tensor`` mesh over ``devices`` (default: all); ``-1`` takes what is left."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(data, fsdp, tensor, len(devices))
  return Mesh(np.asarray(devices).reshape(tuple(shape[a] for a in AXES)), AXES)


def logical_spec(names: Sequence[str | None], shape: Sequence[int], mesh_shape: Mapping[str, int],
                 rules=RULES) -> P:
  """The spec of an activation whose dimensions are ``names`` (non-dividing ones unconstrained)."""
  return partitioning.spec(mesh_shape, rules, names, shape)


# ---- parameters ---------------------------------------------------------------------------------

@functools.cache
def param_axes_table() -> tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]:
  """Every family's ``PARAM_AXES`` (path pattern -> logical names), longest patterns first; two
  families naming one pattern differently is an error."""
  from gamejax.models import families
  table: dict[tuple[str, ...], tuple[str, ...]] = {}
  for name, family in sorted(families.FAMILIES().items()):
    for pattern, names in getattr(family, "PARAM_AXES", {}).items():
      key = tuple(pattern.split("/"))
      if table.setdefault(key, tuple(names)) != tuple(names):
        raise ShardingError(f"PARAM_AXES of {name}: {pattern!r} is {names}, another family has "
                            f"{table[key]}")
  return tuple(sorted(table.items(), key=lambda kv: -len(kv[0])))


def param_axes(path: Sequence[str], ndim: int) -> tuple[str, ...] | None:
  """The logical names of the parameter at ``path`` (keys from the root), or None when no family's
  table has a pattern that ends the path with ``ndim`` names."""
  path = tuple(path)
  for pattern, names in param_axes_table():
    if len(pattern) <= len(path) and path[-len(pattern):] == pattern and len(names) == ndim:
      return names
  return None


def param_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
  """The plain FSDP rule (parameters no table names): the largest dimension divisible by
  ``fsdp_size`` over ``fsdp``; else replicated."""
  if fsdp_size <= 1 or not shape:
    return P()
  dims = sorted(range(len(shape)), key=lambda d: -shape[d])
  for d in dims:
    if shape[d] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[d] = "fsdp"
      return P(*spec)
  return P()


def param_spec_at(path: Sequence[str], shape: Sequence[int], mesh_shape: Mapping[str, int],
                  rules=RULES) -> P:
  """The spec of the parameter at ``path``: by its logical names under ``rules`` if a family
  names it (a ShardingError names the parameter when a dimension does not divide), else
  ``param_spec``."""
  shape = tuple(int(s) for s in shape)
  names = param_axes(path, len(shape))
  if names is None:
    return param_spec(shape, mesh_shape.get("fsdp", 1))
  try:
    return partitioning.spec(mesh_shape, rules, names, shape, strict=True,
                             replicate_when_fewer=REPLICATE_WHEN_FEWER,
                             replicate_when_uneven=REPLICATE_WHEN_UNEVEN,
                             what=f"param {'/'.join(path)}")
  except partitioning.AxisError as e:
    raise ShardingError(str(e)) from None


def path_keys(path) -> tuple[str, ...]:
  """A pytree key path as strings (dict keys, attribute names, sequence indices)."""
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
    else:
      out.append(str(k))
  return tuple(out)


def param_specs(tree: Any, mesh_shape: Mapping[str, int], rules=RULES) -> Any:
  """``param_spec_at`` for every array of a (possibly abstract) params tree."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: param_spec_at(path_keys(p), x.shape, mesh_shape, rules), tree)


def check_params(tree: Any, mesh_shape: Mapping[str, int], rules=RULES) -> None:
  """Raises the ShardingError of the first parameter that does not divide over the mesh."""
  param_specs(tree, mesh_shape, rules)


def mirrored_specs(tree: Any, params: Any, mesh_shape: Mapping[str, int], rules=RULES) -> Any:
  """Specs for an optimizer state of ``params``: a leaf whose path ends with a parameter's path
  and has its shape (Adam's ``mu``/``nu``) takes that parameter's spec; any other leaf (a step
  count, a factored second moment) the plain FSDP rule."""
  by_path = {}
  for p, x in jax.tree_util.tree_leaves_with_path(params):
    keys = path_keys(p)
    by_path[keys] = (tuple(x.shape), param_spec_at(keys, x.shape, mesh_shape, rules))

  def one(p, x):
    keys, shape = path_keys(p), tuple(x.shape)
    for start in range(len(keys)):
      hit = by_path.get(keys[start:])
      if hit is not None and hit[0] == shape:
        return hit[1]
    return param_spec(shape, mesh_shape.get("fsdp", 1))
  return jax.tree_util.tree_map_with_path(one, tree)


def state_shardings(mesh: Mesh, abstract_state: Any, params: Any = None, rules=RULES) -> Any:
  """NamedShardings for every array of a (possibly abstract) params tree, or, with ``params``,
  of an optimizer state that mirrors them."""
  shape = dict(mesh.shape)
  specs = (param_specs(abstract_state, shape, rules) if params is None
           else mirrored_specs(abstract_state, params, shape, rules))
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda s: isinstance(s, P))


# ---- batches ------------------------------------------------------------------------------------

def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
  """Rows split over ``data`` and ``fsdp`` (replicated over ``tensor``); ``leading`` unsplit axes
  (e.g. the K steps of a scan) before."""
  return NamedSharding(mesh, P(*([None] * leading), BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_shards(mesh: Mesh) -> int:
  """How many ways a batch's rows are split."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_size(mesh: Mesh, batch_size: int) -> None:
  n = batch_shards(mesh)
  if batch_size % n:
    raise ValueError(f"batch_size={batch_size} is not divisible by the {n} batch shards "
                     f"(data x fsdp) of the mesh {dict(mesh.shape)}")
