"""A group's prompt computed once in a training forward.

A sampled play's ``G`` completions of one prompt are ``G`` rows that open with the same tokens. A
forward over the record computes that prompt ``G`` times, in the policy's forward and backward
and in the reference's forward. When the record says what its rows share
(``records.SharedPrompt``: ``sampled_play(..., share_prompt=True)``), ``apply`` computes it once:

1. each row is un-aligned: the record right-aligns a row's tokens (``policy.right_align``); here
   row ``i`` becomes ``[its prompt, left-padded to width L | the rest of its row, N = T - L
   slots, left-aligned]``, so that the ``G`` rows of a group hold the same first ``L`` slots;
2. the ``U = B / G`` prompts are prefilled into a KV cache (``apply_with_cache``, as the sampler
   does), the cache is repeated to the ``B`` rows, and each row's rest is run over it;
3. the final norm's states are gathered back to the record's slots and the LM head reads them
   there: the logits take the memory of the full forward's (``[B, T, V]``, once), not more.

A cached forward is the full forward's causal attention over the same tokens (each query sees the
slots of its own segment up to its own), so the logits are those of ``lm.apply`` on the record, up
to float rounding: a GEMM's rows round by how many rows it multiplies, and here the prompt's rows
are ``G`` times fewer. The gradient of the prompt's keys and values sums the group's rows (the
transpose of the repeat). The trunk's dense work falls from ``B*T`` token rows to ``U*L + B*N``;
the LM head still reads ``B*T`` (a share of a step's FLOPs that grows with the vocabulary).

The layout is what the play's record promises: rows right-aligned (their tokens in their last
slots), each prompt no longer than ``L`` nor its row, the rest no longer than ``N``, and every row
of a group opening with its group's prompt. ``layout_holds`` checks it (``apply(checked=True)``
falls back to the full forward where it fails); the game step keeps the promise by dropping
``shared_prompt`` wherever it takes rows that split groups (a random minibatch, a microbatch
smaller than a group).

>>> import jax, numpy as np
>>> from gamejax import records
>>> from gamejax.models import lm
>>> from gamejax.models.llama import LlamaConfig
>>> cfg = LlamaConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)
>>> params = lm.init_params(cfg, jax.random.key(0))
>>> tokens = np.array([[0, 5, 6, 7, 8], [5, 6, 7, 9, 4]], np.int32)     # prompt 5 6 7, group 2
>>> segments = (tokens > 0).astype(np.int32)
>>> positions = np.array([[0, 0, 1, 2, 3], [0, 1, 2, 3, 4]], np.int32)
>>> share = records.SharedPrompt(np.array([3, 3], np.int32), group_size=2, width=3)
>>> full = jax.jit(lambda p: lm.apply(cfg, p, tokens, positions, segments))(params)
>>> once = jax.jit(lambda p: apply(cfg, p, tokens, positions, segments, share))(params)
>>> bool(np.allclose(full[segments > 0], once[segments > 0], atol=1e-5))
True
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gamejax import records
from gamejax.models import lm


def check(share: records.SharedPrompt, shape: tuple[int, ...]) -> None:
  """A ``ValueError`` where ``share`` cannot describe a record of ``shape`` ``[B, T]`` (static)."""
  b, t = shape
  g, width = share.group_size, share.width
  problems = []
  if g < 1 or b % g:
    problems.append(f"{b} rows do not split into groups of group_size={g}")
  if not 1 <= width < t:
    problems.append(f"the prompt width {width} must be >= 1 and below the record's {t} slots")
  if tuple(jnp.shape(share.prompt_lengths)) != (b,):
    problems.append(f"prompt_lengths has shape {list(jnp.shape(share.prompt_lengths))}, not "
                    f"[{b}] (one per row)")
  if problems:
    raise ValueError("a shared prompt does not fit a record of shape "
                     f"{list(shape)}: {'; '.join(problems)}")


def unaligned_slots(segment_ids_BT, prompt_lengths_B, width: int):
  """``(source int32[B, T], real bool[B, T], record_slot int32[B, T])``: for each un-aligned slot
  (prompt left-padded to ``width``, then the rest of the row left-aligned) the record slot it
  reads and whether it holds a token; and for each record slot the un-aligned slot that holds it
  (clamped into the row; only real tokens' matter)."""
  t = jnp.shape(segment_ids_BT)[1]
  n = t - width
  prompt_lengths_B = jnp.asarray(prompt_lengths_B, jnp.int32)
  length_B = (jnp.asarray(segment_ids_BT) > 0).sum(axis=1).astype(jnp.int32)
  shift_B1 = (n - (length_B - prompt_lengths_B))[:, None]    # record slot = un-aligned slot + shift
  slot_1T = jnp.arange(t, dtype=jnp.int32)[None, :]
  p_B1 = prompt_lengths_B[:, None]
  real_BT = jnp.where(slot_1T < width, slot_1T >= width - p_B1,
                      slot_1T - width < length_B[:, None] - p_B1)
  source_BT = jnp.clip(slot_1T + shift_B1, 0, t - 1)
  return source_BT, real_BT, jnp.clip(slot_1T - shift_B1, 0, t - 1)


def unaligned_rows(tokens_BT, positions_BT, segment_ids_BT, share: records.SharedPrompt):
  """``((tokens, positions, segment ids), record_slot)``: the record's rows un-aligned
  (``unaligned_slots``: each row its prompt left-padded to ``share.width``, then the rest
  left-aligned; padding 0), and for each record slot the un-aligned slot that holds it."""
  source_BT, real_BT, record_slot_BT = unaligned_slots(segment_ids_BT, share.prompt_lengths,
                                                       share.width)
  rows = tuple(jnp.where(real_BT, jnp.take_along_axis(jnp.asarray(x, jnp.int32), source_BT,
                                                      axis=1), 0)
               for x in (tokens_BT, positions_BT, segment_ids_BT))
  return rows, record_slot_BT


def layout_holds(tokens_BT, positions_BT, segment_ids_BT, share: records.SharedPrompt):
  """``bool[]``: the record is laid out as ``share`` says (rows right-aligned, each prompt no
  longer than the width nor its row, the rest no longer than ``T - width``, every row of a group
  opening with the group's prompt), so that ``once`` computes ``lm.apply``'s logits."""
  check(share, jnp.shape(tokens_BT))
  t = jnp.shape(tokens_BT)[1]
  g, width = share.group_size, share.width
  p_B = jnp.asarray(share.prompt_lengths, jnp.int32)
  length_B = (jnp.asarray(segment_ids_BT) > 0).sum(axis=1)
  aligned = ((jnp.asarray(segment_ids_BT) > 0)
             == (jnp.arange(t)[None, :] >= (t - length_B)[:, None])).all()
  fits = ((p_B >= 0) & (p_B <= jnp.minimum(width, length_B)) & (length_B - p_B <= t - width)).all()
  rows, _ = unaligned_rows(tokens_BT, positions_BT, segment_ids_BT, share)
  shared = jnp.stack([(x[:, :width] == jnp.repeat(x[::g, :width], g, axis=0)).all()
                      for x in rows]).all()
  return aligned & fits & shared


def once(cfg: lm.Config, params: Any, tokens_BT, positions_BT, segment_ids_BT,
         share: records.SharedPrompt, head: bool = True):
  """``float32[B, T, V]``: the record's logits with each group's prompt computed once, from the
  first row of each group (steps 1-3 of the module docstring); ``lm.apply``'s only where
  ``layout_holds``. ``head=False``: the final norm's states ``[B, T, D]`` the LM head reads
  (``lm.hidden``'s)."""
  check(share, jnp.shape(tokens_BT))
  b, t = jnp.shape(tokens_BT)
  g, width = share.group_size, share.width
  rows, slot_BT = unaligned_rows(tokens_BT, positions_BT, segment_ids_BT, share)
  cache = lm.init_cache(cfg, b // g, t)
  prompt_ULD, cache = lm.apply_with_cache(cfg, params, *(x[::g, :width] for x in rows), cache, 0,
                                          trained=True, hidden=True)
  cache = jax.tree.map(lambda x: jnp.repeat(x, g, axis=0), cache)
  rest_BND, _ = lm.apply_with_cache(cfg, params, *(x[:, width:] for x in rows), cache, width,
                                    trained=True, hidden=True)
  d = rest_BND.shape[-1]
  flat = jnp.concatenate([prompt_ULD.reshape(-1, d), rest_BND.reshape(-1, d)], axis=0)
  row_B1 = jnp.arange(b, dtype=jnp.int32)[:, None]
  index_BT = jnp.where(slot_BT < width, (row_B1 // g) * width + slot_BT,
                       (b // g) * width + row_B1 * (t - width) + slot_BT - width)
  states_BTD = jnp.take(flat, index_BT, axis=0)
  return lm.lm_head(cfg, params, states_BTD) if head else states_BTD.astype(jnp.float32)


def apply(cfg: lm.Config, params: Any, tokens_BT, positions_BT, segment_ids_BT,
          share: records.SharedPrompt, checked: bool = False):
  """``float32[B, T, V]``: ``lm.apply``'s next-token logits of the record, each group's prompt
  computed once (``once``). ``checked``: only where ``layout_holds``, else the full forward
  (``lax.cond``; its branches cost copies of their operands and results, which is why the step
  does not check: it trusts the play's record and drops ``shared_prompt`` where it takes rows
  that split groups, ``step.take_moves``)."""
  inputs = tuple(jnp.asarray(x, jnp.int32) for x in (tokens_BT, positions_BT, segment_ids_BT))
  if not checked:
    return once(cfg, params, *inputs, share)
  return jax.lax.cond(layout_holds(*inputs, share),
                      lambda p: once(cfg, p, *inputs, share),
                      lambda p: lm.apply(cfg, p, *inputs), params)
