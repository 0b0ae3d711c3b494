"""Weights stored fused: one leaf holding several of the standard layout's weights.

A family whose forward multiplies by several weights as one GEMM stores them as one leaf (Llama's
``wqkv = wq | wk | wv`` and ``w_gate_up = w_gate | w_up``), so that no step concatenates them.
Checkpoints (Hugging Face, GGUF, PEFT adapters) and LoRA targets name the *standard* weights
(``wq``, ``w_gate``, ...). A ``Fused`` spec says how the standard leaves of one parent dict make
the stored one; ``fuse`` and ``unfuse`` convert a whole params tree, and ``locate`` gives where a
standard leaf lives in the stored tree (``part``, ``set_part`` read and write it there).

A gradient's global norm is a sum over leaves, so its float rounding depends on how the weights
are cut into leaves: ``global_norm`` and ``clip_by_global_norm`` sum over the standard layout's
leaves, in its order, and give bitwise the norm (and the clipped update) of the unfused tree.

>>> import numpy as np
>>> spec = Fused("wqkv", ("wq", "wk"), axis=1, sizes=(2, 1))
>>> std = {"attn": {"wq": np.ones((3, 2, 4)), "wk": np.zeros((3, 1, 4)), "wo": np.ones(2)}}
>>> stored = fuse(std, (spec,))
>>> sorted(stored["attn"]), stored["attn"]["wqkv"].shape
(['wo', 'wqkv'], (3, 3, 4))
>>> bool((unfuse(stored, (spec,))["attn"]["wk"] == 0).all())
True
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

Params = Any


@dataclasses.dataclass(frozen=True)
class Fused:
  """The stored leaf ``name`` of a parent dict holding its standard leaves ``parts``, in order,
  along ``axis``: concatenated, part ``i`` taking ``sizes[i]`` entries of that axis, or, with
  ``sizes=()``, stacked (each part one index of a new axis)."""
  name: str
  parts: tuple[str, ...]
  axis: int
  sizes: tuple[int, ...] = ()

  def index(self, i: int, ndim: int) -> tuple:
    """The index of part ``i`` in the stored leaf (``ndim``: the stored leaf's rank)."""
    if self.sizes:
      start = sum(self.sizes[:i])
      at: Any = slice(start, start + self.sizes[i])
    else:
      at = i
    return (slice(None),) * self.axis + (at,) + (slice(None),) * (ndim - self.axis - 1)

  def join(self, arrays: Sequence):
    """The stored leaf of the parts' arrays (NumPy in, NumPy out; else jax.numpy)."""
    xp = np if all(isinstance(a, np.ndarray) for a in arrays) else jnp
    if self.sizes:
      return xp.concatenate(arrays, axis=self.axis)
    return xp.stack(arrays, axis=self.axis)


Specs = Sequence[Fused]


def map_dicts(tree, fn):
  """``fn`` applied to every dict of ``tree``, children first, at any depth and inside any pytree
  container: a params tree, or a whole game state (the optimizer's moments inside its state
  tuples, frozen players, LoRA adapters)."""
  if isinstance(tree, dict):
    return fn({k: map_dicts(v, fn) for k, v in tree.items()})
  if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(tree)):
    return tree
  return jax.tree.map(lambda x: map_dicts(x, fn), tree, is_leaf=lambda x: isinstance(x, dict))


def fuse(params: Params, specs: Specs) -> Params:
  """The stored tree of a standard one (params, or a state holding them): in every dict holding
  all of a spec's parts as leaves, the parts replaced by their joined leaf. (A dict whose parts
  are dicts, LoRA's adapters of ``wq``, ``wk``, ``wv``, stays as it is.)"""
  def one(node: dict) -> dict:
    for spec in specs:
      if all(p in node and not isinstance(node[p], dict) for p in spec.parts):
        node = {k: v for k, v in node.items() if k not in spec.parts} | {
            spec.name: spec.join([node[p] for p in spec.parts])}
    return node
  return map_dicts(params, one)


def unfuse(params: Params, specs: Specs) -> Params:
  """The standard tree of a stored one (``fuse`` inverted; params, or a state holding them)."""
  def one(node: dict) -> dict:
    for spec in specs:
      if spec.name in node and not isinstance(node[spec.name], dict):
        x = node[spec.name]
        node = {k: v for k, v in node.items() if k != spec.name} | {
            p: x[spec.index(i, x.ndim)] for i, p in enumerate(spec.parts)}
    return node
  return map_dicts(params, one)


def locate(path: Sequence[str], specs: Specs) -> tuple[tuple[str, ...], Fused | None, int]:
  """Where the standard leaf at ``path`` is stored: ``(stored path, spec, part index)``, or
  ``(path, None, -1)`` when it is stored as it is."""
  path = tuple(path)
  for spec in specs:
    if path and path[-1] in spec.parts:
      return path[:-1] + (spec.name,), spec, spec.parts.index(path[-1])
  return path, None, -1


def part(stored_leaf, spec: Fused, i: int):
  """Part ``i`` of a stored leaf, in the standard layout."""
  return stored_leaf[spec.index(i, stored_leaf.ndim)]


def set_part(stored_leaf, spec: Fused, i: int, value):
  """The stored leaf with part ``i`` replaced by ``value`` (standard layout)."""
  return stored_leaf.at[spec.index(i, stored_leaf.ndim)].set(value)


def global_norm(tree, specs: Specs) -> jax.Array:
  """``optax.tree.norm`` of the standard layout's leaves (``unfuse``; the slices fuse into the
  reductions, nothing is copied): bitwise the norm of the same tree unfused."""
  return optax.tree.norm(unfuse(tree, specs) if specs else tree)


def clip_by_global_norm(max_norm: float, specs: Specs = ()
                        ) -> optax.GradientTransformationExtraArgs:
  """``optax.clip_by_global_norm(max_norm)`` with the norm of ``global_norm``: the update of the
  unfused tree, bitwise, on the stored one.

  A caller that has computed that norm already (the game step logs it) passes it as the extra
  argument ``grad_norm`` (``optax.chain`` forwards extra arguments), and the updates are not read
  a second time to compute it again.
  """
  def update_fn(updates, state, params=None, *, grad_norm=None, **extra_args):
    del params, extra_args
    g_norm = global_norm(updates, specs) if grad_norm is None else grad_norm
    trigger = jnp.squeeze(g_norm < max_norm)
    return jax.tree.map(
        lambda t: jax.lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * max_norm),
        updates), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)
