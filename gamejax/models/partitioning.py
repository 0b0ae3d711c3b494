"""Logical axis names: what the models call their dimensions, and how a rules table maps those names
onto the axes of a device mesh.

A model names the dimensions of its activations (``"batch"``, ``"length"``, ``"embed"``,
``"heads"``, ``"mlp"``, ``"vocab"``, ...) and calls ``constrain(x, names)``; a family names the
dimensions of its parameters in its ``PARAM_AXES`` table (beside its Hugging Face name map). Which
mesh axis a name is split over is decided elsewhere, by one rules table
(``gamejax.sharding.RULES``: ``(("batch", ("data", "fsdp")), ("heads", "tensor"), ...)``).

``constrain`` is a no-op (it returns ``x`` itself) outside ``rules(mesh, table)`` and on a mesh
of one device, so sampling, evaluation and single-device runs trace exactly the graph they
would without it. The compiled game step (``gamejax.step.make_step``) traces the models inside
``rules``, where each constraint becomes ``jax.lax.with_sharding_constraint``.

>>> import jax, numpy as np
>>> spec({"data": 2, "fsdp": 4, "tensor": 1}, (("batch", ("data", "fsdp")), ("embed", "fsdp")),
...      ("batch", "length", "embed"), (8, 16, 32))
P(('data', 'fsdp'), None, None)
>>> x = np.ones((2, 3))
>>> constrain(x, ("batch", "embed")) is x       # no rules in context: nothing happens
True
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Mapping, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, "str | tuple[str, ...] | None"]]
# (mesh, rules) while a compiled step traces the models; None otherwise.
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("gamejax_axis_rules", default=None)


class AxisError(ValueError):
  """A named dimension does not divide over the mesh axes its rule gives it."""


def mesh_axes_of(rules: Rules, name: str | None) -> tuple[str, ...]:
  """The mesh axes the rule of logical ``name`` gives (``()``: replicated; unnamed: replicated)."""
  for logical, axes in rules:
    if logical == name:
      return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
  return ()


def spec(mesh_shape: Mapping[str, int], rules: Rules, names: Sequence[str | None],
         shape: Sequence[int], strict: bool = False, replicate_when_fewer: Sequence[str] = (),
         replicate_when_uneven: Sequence[str] = (),
         what: str = "array") -> P:
  """The ``PartitionSpec`` of an array of ``shape`` whose dimensions are called ``names``.

  Each mesh axis splits at most one dimension (the first that names it: batch before embed);
  axes of size 1 are left out. A dimension that its axes do not divide is replicated when its
  name is in ``replicate_when_fewer`` and it is smaller than the axes (GQA's kv heads fewer than
  the tensor axis) or in ``replicate_when_uneven`` (a fused ``q | k | v`` heads axis), else left
  unconstrained (``strict=False``, activations) or an ``AxisError``
  naming ``what`` (``strict=True``, parameters).
  """
  if len(names) != len(shape):
    raise AxisError(f"{what}: {len(names)} axis names {tuple(names)} for shape {tuple(shape)}")
  used, out = set(), []
  for d, (name, size) in enumerate(zip(names, shape)):
    axes = tuple(a for a in mesh_axes_of(rules, name) if a not in used and mesh_shape.get(a, 1) > 1)
    n = math.prod(mesh_shape[a] for a in axes)
    if axes and size % n:
      if (name in replicate_when_fewer and size < n) or name in replicate_when_uneven:
        axes = ()
      elif strict:
        where = " x ".join(f"{a}={mesh_shape[a]}" for a in axes)
        raise AxisError(f"{what}: dim {d} ({name}={size}) is not divisible by mesh {where}")
      else:
        axes = ()
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


@contextlib.contextmanager
def rules(mesh: jax.sharding.Mesh, table: Rules):
  """Within: ``constrain`` puts sharding constraints over ``mesh`` by ``table``."""
  token = _ACTIVE.set((mesh, tuple(table)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def split_count(name: str) -> int:
  """How many ways the active rules split the logical dimension ``name`` (1 with no rules active
  or on one device): a model picks a layout by it (Llama's q | k | v heads grouped by kv head
  under tensor parallelism)."""
  active = _ACTIVE.get()
  if active is None or active[0].size == 1:
    return 1
  mesh, table = active
  return math.prod(mesh.shape[a] for a in mesh_axes_of(table, name))


def constrain(x, names: Sequence[str | None]):
  """``x`` constrained to the sharding its logical dimension ``names`` give under the active
  rules; ``x`` itself with no rules active or on a one-device mesh. A dimension its axes do not
  divide is left to XLA's propagation."""
  active = _ACTIVE.get()
  if active is None or active[0].size == 1:
    return x
  mesh, table = active
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, spec(dict(mesh.shape), table, names, x.shape)))
