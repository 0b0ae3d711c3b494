"""Meshes and shardings: a ``("data", "fsdp")`` mesh, FSDP parameter shardings, batch shardings.

Batches are split over both axes (every device sees its own rows); each parameter is split over
``fsdp`` along its largest dimension divisible by the axis size, and replicated over ``data``.
The same code runs on one CPU device (a 1x1 mesh) and on a pod slice.

>>> mesh = make_mesh(data=1, fsdp=1)
>>> mesh.axis_names
('data', 'fsdp')
"""
from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")
BATCH_AXES = AXES  # a batch's row axis is split over every mesh axis


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """A ``data x fsdp`` mesh over ``devices`` (default: all); ``-1`` takes what is left."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if data == -1:
    if n % fsdp:
      raise ValueError(f"mesh: fsdp={fsdp} does not divide the {n} available devices")
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(f"mesh: data={data} x fsdp={fsdp} != {n} devices")
  return Mesh(np.asarray(devices).reshape(data, fsdp), AXES)


def param_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
  """Shard the largest dimension divisible by ``fsdp_size`` over ``fsdp``; else replicate."""
  if fsdp_size <= 1 or not shape:
    return P()
  dims = sorted(range(len(shape)), key=lambda d: -shape[d])
  for d in dims:
    if shape[d] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[d] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(mesh: Mesh, abstract_state: Any) -> Any:
  """NamedShardings for every array of a (possibly abstract) state pytree."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp)),
                      abstract_state)


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
  """Rows split over all mesh axes; ``leading`` unsplit axes (e.g. the K steps of a scan) before."""
  return NamedSharding(mesh, P(*([None] * leading), BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(mesh: Mesh, batch_size: int) -> None:
  n = math.prod(mesh.shape.values())
  if batch_size % n:
    raise ValueError(f"batch_size={batch_size} is not divisible by the {n} devices of the mesh "
                     f"{dict(mesh.shape)}")
