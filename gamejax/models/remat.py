"""Rematerialisation of decoder blocks: the config field ``remat`` names what a block keeps for
its backward pass; the rest is recomputed there (``jax.checkpoint`` / ``flax.linen.remat``).

- ``"none"``: no rematerialisation, every residual is kept (the default; the compiled step is
  exactly as without this module);
- ``"full"``: a block keeps only its inputs and recomputes its whole forward in the backward
  (``jax.checkpoint_policies.nothing_saveable``): least memory, one more forward of the trunk;
- ``"dots"``: a block keeps the outputs of its weight matmuls (``kernels.dense``'s, named
  ``kernels.DENSE_OUTPUT``) and recomputes the cheap rest: norms, RoPE, activations and attention
  (``save_only_these_names``). It is what ``dots_with_no_batch_dims_saveable`` does in a model of
  plain ``dot_general``s; here the matmuls sit inside ``custom_vjp`` kernels that no primitive-based
  policy can see, so they carry a name instead (JAX's policies on these kernels would save nothing).

A rematerialised block has the same module names, so the params tree (and the HF name map) does
not change; only the decoding path (with a KV cache, never differentiated) never rematerialises.

>>> policy("dots") is not None, policy("none") is None
(True, True)
>>> check("LlamaConfig", "everything")
"LlamaConfig.remat='everything' must be one of ['dots', 'full', 'none']"
"""
from __future__ import annotations

import flax.linen as nn
import jax

from gamejax.models.kernels import DENSE_OUTPUT

POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.save_only_these_names(DENSE_OUTPUT),
}


def check(config_name: str, remat: str) -> str | None:
  """The message for a ``remat`` value that names no policy (None: it is fine)."""
  if not isinstance(remat, str) or remat not in POLICIES:
    return f"{config_name}.remat={remat!r} must be one of {sorted(POLICIES)}"
  return None


def policy(remat: str):
  """The ``jax.checkpoint`` policy of ``remat`` (None for ``"none"``)."""
  return POLICIES[remat]


def block_class(block: type[nn.Module], remat: str, decoding: bool) -> type[nn.Module]:
  """``block``, or its rematerialised version (same name, same params) when ``remat`` asks for one
  and the forward is not a cached decode."""
  if remat == "none" or decoding:
    return block
  return nn.remat(block, policy=POLICIES[remat])
