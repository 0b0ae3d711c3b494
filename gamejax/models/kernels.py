"""Compute kernels of the Llama decoder, shaped for XLA:CPU (and fine on accelerators).

The training step is bound by small GEMMs and memory passes, so the pieces whose autodiff backward
compiles badly on XLA:CPU have their backward written out (``jax.custom_vjp``): ``dense`` (a
linear layer), ``swiglu`` and ``self_attention`` (block-causal, RoPE fused into its backward).
Each is checked against autodiff and finite differences in tests/test_model.py.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

def _matmul(x, w, contract_w: int, out_dtype):
  dims = (((x.ndim - 1,), (contract_w,)), ((), ()))
  return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32).astype(out_dtype)


# The name every ``dense`` output carries (``jax.ad_checkpoint.checkpoint_name``): the
# rematerialisation policy ``"dots"`` (``gamejax.models.remat``) saves these. A policy cannot see
# the matmul inside a ``custom_vjp``, so the name is put on its output; outside ``jax.checkpoint``
# the name is the identity and compiles to nothing.
DENSE_OUTPUT = "dense_output"


def dense(x, w, contract_w: int = 0, out_dtype=None):
  """``x[..., D]`` times a 2-D weight: ``w[D, F]`` (``contract_w=0``) or ``w[F, D]``
  (``contract_w=1``, e.g. a tied embedding as LM head). Inputs in ``x``'s dtype, float32
  accumulation, result in ``out_dtype`` (default ``x``'s dtype).

  The backward is the two GEMMs in the forms XLA:CPU runs fastest: ``dx = dy w^T`` and
  ``dw = x^T dy`` over the flattened tokens. (Autodiff's ``transpose(dot(dy, x))`` compiles to a
  transposed copy of ``dy`` and a dot with both operands transposed, about half as fast.)

  >>> x, w = jnp.ones((2, 3, 4)), jnp.ones((4, 5))
  >>> dense(x, w).shape, dense(x, w.T, 1).shape
  ((2, 3, 5), (2, 3, 5))

  ``w`` may be a ``LowRank`` (a frozen weight and LoRA's deltas): see ``low_rank_dense``.
  """
  if isinstance(w, LowRank):
    if contract_w == 0:
      return low_rank_dense(x, w, out_dtype)
    w = w.materialize()          # read transposed (``[F, D]``): the adapted weight, formed
  return checkpoint_name(_dense(x, w, contract_w, out_dtype), DENSE_OUTPUT)


@functools.partial(jax.tree_util.register_dataclass, data_fields=("w", "a", "b"),
                   meta_fields=("cols", "scale"))
@dataclasses.dataclass(frozen=True)
class LowRank:
  """A weight ``w`` plus low-rank deltas: ``scale * a[i] @ b[i]`` (``a[i]: [n_in, r]``, ``b[i]:
  [r, c1 - c0]``) added to columns ``cols[i] = (c0, c1)`` of its 2-D form ``w.reshape(n_in,
  -1)``, where ``n_in`` is ``a``'s rows. LoRA's adapted weight as the training forward reads it
  (``gamejax.models.lora.low_rank_params``): ``dense`` computes ``x w + scale (x a) b`` and never forms
  the adapted weight, so its backward has no ``x^T dy`` GEMM for ``w`` (which is frozen).

  A model reads its weights as arrays; a ``LowRank`` answers ``reshape`` to its 2-D form and
  ``astype`` as one, and any other use (an index, a regrouping under tensor parallelism, a
  ``jax.numpy`` function) gets ``materialize()``: the adapted weight, formed.

  >>> w = jnp.ones((2, 3, 2))                    # n_in = 2, its 2-D form [2, 6]
  >>> lr = LowRank(w, (jnp.ones((2, 1)),), (jnp.ones((1, 2)),), ((2, 4),), 0.5)
  >>> lr.materialize().reshape(2, 6).tolist()[0]
  [1.0, 1.0, 1.5, 1.5, 1.0, 1.0]
  >>> x = jnp.ones((1, 2))
  >>> bool((dense(x, lr.reshape(2, -1)) == x @ lr.materialize().reshape(2, 6)).all())
  True
  """
  w: jax.Array
  a: tuple
  b: tuple
  cols: tuple
  scale: float

  shape = property(lambda self: self.w.shape)
  ndim = property(lambda self: self.w.ndim)
  dtype = property(lambda self: self.w.dtype)
  n_in = property(lambda self: self.a[0].shape[0])

  def reshape(self, *shape):
    """Its 2-D form ``[n_in, n_out]`` as a ``LowRank``; any other shape materialised."""
    shape = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
    n_out = self.w.size // self.n_in
    if len(shape) == 2 and shape[0] == self.n_in and shape[1] in (n_out, -1):
      return dataclasses.replace(self, w=self.w.reshape(self.n_in, n_out))
    return self.materialize().reshape(shape)

  def astype(self, dtype):
    return dataclasses.replace(self, w=self.w.astype(dtype))

  def materialize(self) -> jax.Array:
    """``w`` with every delta added, in float32 then ``w``'s dtype: the adapted weight."""
    w2 = self.w.reshape(self.n_in, -1)
    for a, b, (c0, c1) in zip(self.a, self.b, self.cols):
      ab = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision="highest")
      w2 = w2.at[:, c0:c1].set((w2[:, c0:c1].astype(jnp.float32) + self.scale * ab)
                               .astype(w2.dtype))
    return w2.reshape(self.w.shape)

  def __getitem__(self, index):
    return self.materialize()[index]

  def __jax_array__(self):
    return self.materialize()

  @property
  def T(self):   # noqa: N802 (numpy's name)
    return self.materialize().T


def low_rank_dense(x, w: LowRank, out_dtype=None):
  """``dense(x, w)`` of a ``LowRank`` in its 2-D form: ``x w + scale (x a) b``. Two GEMMs beside
  ``dense``'s of ``w``: ``x`` by all the ``a`` side by side (``[n_in, sum r]``), then by one
  ``[sum r, n_out]`` holding each ``b`` at its rows and columns (zeros elsewhere: one GEMM, not
  one per delta and a concatenation). Differentiated with respect to the adapters, the backward
  costs ``dx = dy w^T`` and rank-sized GEMMs, where the adapted weight's would add ``x^T dy``
  over the whole weight (a third of a layer's training FLOPs)."""
  if w.w.ndim != 2:
    raise ValueError(f"dense reads a LowRank in its 2-D form [n_in, n_out]; got {w.w.shape}")
  out_dtype = out_dtype or x.dtype
  ranks = np.cumsum([0] + [a.shape[1] for a in w.a])
  xa = _dense(x, jnp.concatenate([a.astype(x.dtype) for a in w.a], axis=1), 0, None) * w.scale
  b_full = jnp.zeros((int(ranks[-1]), w.w.shape[1]), x.dtype)
  for b, (c0, c1), r0, r1 in zip(w.b, w.cols, ranks[:-1], ranks[1:]):
    b_full = b_full.at[r0:r1, c0:c1].set(b.astype(x.dtype))
  # One named output, as a plain ``dense``'s: rematerialisation's "dots" saves the sum alone.
  return checkpoint_name(_dense(x, w.w, 0, out_dtype) + _dense(xa, b_full, 0, out_dtype),
                         DENSE_OUTPUT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense(x, w, contract_w: int, out_dtype):
  return _matmul(x, w.astype(x.dtype), contract_w, out_dtype or x.dtype)


def _dense_fwd(x, w, contract_w, out_dtype):
  return _dense(x, w, contract_w, out_dtype), (x, w)


def _dense_bwd(contract_w, out_dtype, res, dy):
  del out_dtype
  x, w = res
  dy = dy.astype(x.dtype)
  dx = _matmul(dy, w.astype(x.dtype), 1 - contract_w, x.dtype)
  x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  operands = (x2, dy2) if contract_w == 0 else (dy2, x2)
  dw = jax.lax.dot_general(*operands, (((0,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32).astype(w.dtype)
  return dx, dw


_dense.defvjp(_dense_fwd, _dense_bwd)


@jax.custom_vjp
def swiglu(gate_up_BTF):
  """``silu(gate) * up`` of the fused ``[..., 2F] = [gate | up]`` projection (float32 math,
  result in the input's dtype). The backward writes the ``[..., 2F]`` gradient in one pass.

  >>> swiglu(jnp.ones((2, 3, 8))).shape  # [gate | up], each of width 4
  (2, 3, 4)
  """
  return _swiglu_fwd(gate_up_BTF)[0]


def silu_times(gate_BTF, up_BTF):
  """``silu(gate) * up`` in float32, in ``gate``'s dtype: SwiGLU's hidden state from its two
  projections (``swiglu`` reads them fused; a tensor-parallel MLP computes them apart)."""
  return (jax.nn.silu(gate_BTF.astype(jnp.float32)) * up_BTF.astype(jnp.float32)).astype(
      gate_BTF.dtype)


def _swiglu_fwd(gate_up_BTF):
  f = gate_up_BTF.shape[-1] // 2
  return silu_times(gate_up_BTF[..., :f], gate_up_BTF[..., f:]), gate_up_BTF


def _swiglu_bwd(gate_up_BTF, d_hidden_BTF):
  f = gate_up_BTF.shape[-1] // 2
  gu = gate_up_BTF.astype(jnp.float32).reshape(gate_up_BTF.shape[:-1] + (2, f))
  gate, up = gu[..., :1, :], gu[..., 1:, :]
  dh = d_hidden_BTF.astype(jnp.float32)[..., None, :]
  sig = jax.nn.sigmoid(gate)
  is_gate = jax.lax.broadcasted_iota(jnp.int32, gu.shape, gu.ndim - 2) == 0
  d_gu = jnp.where(is_gate, dh * up * sig * (1.0 + gate * (1.0 - sig)), dh * gate * sig)
  return (d_gu.reshape(gate_up_BTF.shape).astype(gate_up_BTF.dtype),)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def rope_frequencies(head_dim: int, theta: float, scaling: tuple = (), on_host: bool = True):
  """``float32[head_dim/2]``: RoPE's inverse frequencies ``theta**(-2i/head_dim)``, with Llama 3's
  frequency-dependent scaling when ``scaling = (factor, low_freq_factor, high_freq_factor,
  original_max_position_embeddings)``: wavelengths longer than ``original / low_freq_factor`` are
  stretched by ``factor``, those shorter than ``original / high_freq_factor`` kept, and those in
  between interpolated linearly in ``original / wavelength``.

  ``on_host``: computed in NumPy float32, bit-identical to transformers' frequencies; else in the
  compiled graph, where XLA's ``pow`` can be an ulp off (a 1e-5 error in ``cos`` by position 600).

  >>> [round(float(f), 6) for f in rope_frequencies(4, 10000.0)]
  [1.0, 0.01]
  >>> [round(float(f), 6) for f in rope_frequencies(4, 10000.0, (8.0, 1.0, 4.0, 64))]
  [1.0, 0.00125]
  """
  if on_host:
    inv_freq = np.float32(1.0) / (np.float32(theta) ** (
        np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
  else:
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if not scaling:
    return inv_freq
  xp = np if on_host else jnp
  factor, low, high, original = (np.float32(v) for v in scaling)
  wavelength = np.float32(2 * np.pi) / inv_freq
  smooth = xp.clip((original / wavelength - low) / (high - low), 0.0, 1.0)
  return ((1 - smooth) * inv_freq / factor + smooth * inv_freq).astype(np.float32)


def rope_tables(positions_BT, head_dim: int, theta: float, scaling: tuple = (),
                on_host: bool = True):
  """``(cos, sin)``, each ``float32[B, T, 1, head_dim/2]``: the RoPE rotation of each position,
  computed once per forward and shared by every layer (``scaling``, ``on_host``: see
  ``rope_frequencies``)."""
  inv_freq = jnp.asarray(rope_frequencies(head_dim, theta, scaling, on_host))
  angles_BTF = positions_BT.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
  return jnp.cos(angles_BTF)[:, :, None, :], jnp.sin(angles_BTF)[:, :, None, :]


def apply_rope(x_BTHK, cos_BT1F, sin_BT1F):
  """Rotary embedding, rotate-half convention (HF Llama): pairs dimension ``i`` with ``i + K/2``."""
  k = x_BTHK.shape[-1]
  x = x_BTHK.astype(jnp.float32)
  x1, x2 = x[..., :k // 2], x[..., k // 2:]
  out = jnp.concatenate([x1 * cos_BT1F - x2 * sin_BT1F, x2 * cos_BT1F + x1 * sin_BT1F], axis=-1)
  return out.astype(x_BTHK.dtype)


def _unrope(dy_BTHK, cos_BT1F, sin_BT1F):
  """The transpose of ``apply_rope`` (rotation by the opposite angles), in float32."""
  k = dy_BTHK.shape[-1]
  dy = dy_BTHK.astype(jnp.float32)
  dy1, dy2 = dy[..., :k // 2], dy[..., k // 2:]
  return jnp.concatenate([dy1 * cos_BT1F + dy2 * sin_BT1F, dy2 * cos_BT1F - dy1 * sin_BT1F],
                         axis=-1)


def rope(x_BTHK, positions_BT, theta: float):
  """Rotary embedding of ``x`` at ``positions`` (``rope_tables`` then ``apply_rope``)."""
  return apply_rope(x_BTHK, *rope_tables(positions_BT, x_BTHK.shape[-1], theta))


def attention_mask(q_segment_BT, q_slot_T, k_segment_BS, k_slot_S):
  """``bool[B, T, S]``: query ``t`` sees key ``s`` iff causal, same non-padding segment, or itself.

  Slots are indices along the (cache) sequence; a padding query (segment 0) sees only its own
  slot, so its softmax row is never empty.
  """
  causal_TS = k_slot_S[None, :] <= q_slot_T[:, None]
  same_BTS = (q_segment_BT[:, :, None] == k_segment_BS[:, None, :]) & (
      q_segment_BT[:, :, None] > 0)
  itself_TS = k_slot_S[None, :] == q_slot_T[:, None]
  return (causal_TS[None] & same_BTS) | itself_TS[None]


def attention_bias(mask_BTS):
  """The additive attention bias of a visibility mask: 0 where visible, float32's lowest else."""
  return jnp.where(mask_BTS, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def cached_bias(segment_ids_BT, k_segment_BS, cache_index, bias_BTS=None):
  """``(bias float32[B, T, S], the cache's segment ids)`` for ``T`` tokens written at slots
  ``cache_index ..`` of a cache whose slots hold segments ``k_segment_BS``: the new tokens'
  segments are written there, and each query sees the slots ``attention_mask`` allows.

  ``bias_BTS`` given: a caller that tracks what each query sees itself (the sampler's decode loop,
  whose bias is a range of slots per row): that bias, and the segment ids left as they are.
  """
  if bias_BTS is not None:
    want = (*segment_ids_BT.shape, k_segment_BS.shape[1])
    if tuple(bias_BTS.shape) != want:
      raise ValueError(f"a cached forward's bias must be [B, T, cache slots] = {list(want)}; got "
                       f"{list(bias_BTS.shape)}")
    return bias_BTS, k_segment_BS
  t = segment_ids_BT.shape[1]
  index = jnp.asarray(cache_index, jnp.int32)
  k_segment_BS = jax.lax.dynamic_update_slice(
      k_segment_BS, segment_ids_BT.astype(jnp.int32), (jnp.zeros((), jnp.int32), index))
  k_slot_S = jnp.arange(k_segment_BS.shape[1], dtype=jnp.int32)
  mask_BTS = attention_mask(segment_ids_BT, index + jnp.arange(t, dtype=jnp.int32),
                            k_segment_BS, k_slot_S)
  return attention_bias(mask_BTS), k_segment_BS


def qkv_groups(n_heads: int, n_kv_heads: int, splits: int) -> int:
  """How many groups ``group_qkv`` makes for ``splits`` devices splitting the heads: the kv
  heads where the devices divide them, else the devices where the kv heads divide them (each kv
  head's queries split over ``splits / G`` devices, each with a copy of its key and value, as
  Megatron replicates kv heads); 0 (the stacked layout) with one device or neither dividing."""
  h, g = n_heads, n_kv_heads
  if splits <= 1 or h % splits:
    return 0
  return g if g % splits == 0 else splits if splits % g == 0 else 0


def group_qkv(x, n_heads: int, n_kv_heads: int, axis: int, groups: int | None = None):
  """``x``'s fused heads axis ``axis``, ``q heads | k heads | v heads`` (``H + 2G``), as two axes
  ``[groups, R + 2]``: each group's ``R = H / groups`` query heads, then its kv head's key and
  value (the grouped layout, whose split over groups gives each device whole groups). ``groups``
  is ``G`` (default) or a multiple of it: then kv head ``g``'s queries fill ``groups / G``
  groups, each with a copy of ``g``'s key and value.

  >>> group_qkv(jnp.arange(8), 4, 2, axis=0).tolist()   # q0 q1 q2 q3 | k0 k1 | v0 v1
  [[0, 1, 4, 6], [2, 3, 5, 7]]
  >>> group_qkv(jnp.arange(6), 4, 1, axis=0, groups=2).tolist()   # q0 q1 q2 q3 | k0 | v0
  [[0, 1, 4, 5], [2, 3, 4, 5]]
  """
  x = jnp.moveaxis(x, axis, 0)
  h, g = n_heads, n_kv_heads
  groups = groups or g
  kv_of_group = lambda part: jnp.repeat(part, groups // g, axis=0)[:, None]
  q = x[:h].reshape(groups, h // groups, *x.shape[1:])
  grouped = jnp.concatenate([q, kv_of_group(x[h:h + g]), kv_of_group(x[h + g:])], axis=1)
  return jnp.moveaxis(grouped, (0, 1), (axis, axis + 1))


def heads(qkv_BTNK, cos_BT1F, sin_BT1F, n_heads: int, n_kv_heads: int):
  """Split the fused projection ``[B, T, H + 2G, K]`` into head-major RoPE'd queries scaled by
  ``1/sqrt(K)``, ``[B, G, T*R, K]`` (rows: time, then the ``R = H/G`` query heads of kv head
  ``g``, i.e. head ``h = g*R + r`` as HF's ``repeat_kv``), and RoPE'd keys and values ``[B, G, T,
  K]``, so that both attention matmuls are plain batched GEMMs over ``(b, g)``. The projection
  may also come grouped, ``[B, T, G, R + 2, K]`` (``group_qkv``): the same split, each kv head's
  queries, key and value side by side."""
  if qkv_BTNK.ndim == 5:
    return _grouped_heads(qkv_BTNK, cos_BT1F, sin_BT1F)
  b, t, _, k = qkv_BTNK.shape
  h, kv = n_heads, n_kv_heads
  qk = apply_rope(qkv_BTNK[:, :, :h + kv], cos_BT1F, sin_BT1F)
  q = (qk[:, :, :h].astype(jnp.float32) / np.sqrt(k).astype(np.float32)).astype(qkv_BTNK.dtype)
  q_BGQK = q.reshape(b, t, kv, h // kv, k).transpose(0, 2, 1, 3, 4).reshape(b, kv, -1, k)
  return q_BGQK, qk[:, :, h:].transpose(0, 2, 1, 3), qkv_BTNK[:, :, h + kv:].transpose(0, 2, 1, 3)


def _grouped_heads(qkv_BTGCK, cos_BT1F, sin_BT1F):
  """``heads`` of the grouped projection ``[B, T, G, R + 2, K]``."""
  b, t, g, c, k = qkv_BTGCK.shape
  r = c - 2
  qk = apply_rope(qkv_BTGCK[:, :, :, :r + 1], cos_BT1F[:, :, None], sin_BT1F[:, :, None])
  q = (qk[:, :, :, :r].astype(jnp.float32) / np.sqrt(k).astype(np.float32)).astype(qk.dtype)
  q_BGQK = q.transpose(0, 2, 1, 3, 4).reshape(b, g, t * r, k)
  return (q_BGQK, qk[:, :, :, r].transpose(0, 2, 1, 3),
          qkv_BTGCK[:, :, :, r + 1].transpose(0, 2, 1, 3))


def merge_heads(x_BGQK, n_heads: int):
  """``[B, G, T*R, K]`` (rows as in ``heads``) -> ``[B, T, H, K]``."""
  b, g, q, k = x_BGQK.shape
  r = n_heads // g
  return x_BGQK.reshape(b, g, q // r, r, k).transpose(0, 2, 1, 3, 4).reshape(b, q // r, n_heads, k)


def softmax_attend(q_BGQK, k_BGSK, v_BGSK, bias_BTS, keys_transposed: bool = False):
  """Attention of ``Q = T*R`` query rows over ``S`` keys per ``(b, g)``, with additive ``bias``;
  float32 scores and softmax. Returns ``(out float32[B, G, Q, K], p float32[B, G, Q, S], 1/l)``
  with ``p`` the unnormalised probabilities and ``l`` their row sums: rows are normalised after
  the ``PV`` matmul, on ``[Q, K]`` rather than ``[Q, S]``. ``keys_transposed``: the keys come as
  ``[B, G, K, S]`` (the KV cache's layout, ``init_kv_cache``)."""
  b, g, q, _ = q_BGQK.shape
  t, s = bias_BTS.shape[1:]
  spec = "bgqk,bgks->bgqs" if keys_transposed else "bgqk,bgsk->bgqs"
  scores = jnp.einsum(spec, q_BGQK, k_BGSK, preferred_element_type=jnp.float32)
  scores = scores.reshape(b, g, t, q // t, s) + bias_BTS[:, None, :, None, :]
  p = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True)).reshape(b, g, q, s)
  inv_l = 1.0 / jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("bgqs,bgsk->bgqk", p.astype(v_BGSK.dtype), v_BGSK,
                   preferred_element_type=jnp.float32) * inv_l
  return out, p, inv_l


def init_kv_cache(batch: int, kv_heads: int, max_len: int, head_dim: int, dtype):
  """One layer's empty KV cache, laid out for the two attention GEMMs of a decode step
  (``cached_attention``): values ``v: [B, G, S, K]`` as ``P V`` reads them, and keys transposed,
  ``k: [B, G, K, S]``, so that ``Q K^T`` reads them as they lie. (XLA:CPU's GEMM repacks an
  operand it must read transposed on every call: with keys stored ``[B, G, S, K]`` the scores'
  GEMM took about three times as long as the ``P V`` one over the same number of values.)

  >>> {name: x.shape for name, x in init_kv_cache(2, 1, 10, 4, jnp.float32).items()}
  {'k': (2, 1, 4, 10), 'v': (2, 1, 10, 4)}
  """
  return {"k": jnp.zeros((batch, kv_heads, head_dim, max_len), dtype),
          "v": jnp.zeros((batch, kv_heads, max_len, head_dim), dtype)}


def grow_slots(x, max_len: int, axis: int):
  """``x`` with zeros (empty slots) appended on ``axis`` up to ``max_len``."""
  extra = max_len - x.shape[axis]
  if extra < 0:
    raise ValueError(f"a cache of {x.shape[axis]} slots cannot grow to {max_len}")
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def grow_kv_cache(layer, max_len: int):
  """One layer's cache (``init_kv_cache``'s layout) with empty slots up to ``max_len``."""
  return {"k": grow_slots(layer["k"], max_len, axis=3), "v": grow_slots(layer["v"], max_len, axis=2)}


def cached_attention(qkv_BTNK, cos_BT1F, sin_BT1F, bias_BTS, kv_cache, cache_index,
                     n_heads: int, n_kv_heads: int):
  """Attention of ``T`` new tokens over a KV cache (``init_kv_cache``'s layout): their keys and
  values written at slots ``cache_index ..`` of ``kv_cache``, then ``softmax_attend`` of their
  queries over all ``S`` slots. A decode step copies nothing but its own new slot. Returns
  ``(out [B, T, H, K] in qkv's dtype, the new cache)``."""
  q_BGQK, k_BGTK, v_BGTK = heads(qkv_BTNK, cos_BT1F, sin_BT1F, n_heads, n_kv_heads)
  zero = jnp.zeros((), jnp.int32)
  index = jnp.asarray(cache_index, jnp.int32)
  new = {"k": jax.lax.dynamic_update_slice(
             kv_cache["k"], k_BGTK.transpose(0, 1, 3, 2).astype(kv_cache["k"].dtype),
             (zero, zero, zero, index)),
         "v": jax.lax.dynamic_update_slice(
             kv_cache["v"], v_BGTK.astype(kv_cache["v"].dtype), (zero, zero, index, zero))}
  dt = qkv_BTNK.dtype
  out_BGQK, _, _ = softmax_attend(q_BGQK, new["k"].astype(dt), new["v"].astype(dt), bias_BTS,
                                  keys_transposed=True)
  return merge_heads(out_BGQK.astype(dt), n_heads), new


ATTENTION_IMPLEMENTATIONS = ("gamejax", "dot_product_attention")


def library_attention(qkv_BTNK, cos_BT1F, sin_BT1F, bias_BTS, n_heads: int, n_kv_heads: int):
  """``self_attention``'s result through ``jax.nn.dot_product_attention`` (GQA native, the mask
  as a boolean ``[B, 1, T, S]``), with JAX's own autodiff: XLA's fused attention, or cuDNN's
  flash attention on a GPU where JAX finds it applies (``implementation=None``). The accelerator
  path of ``LlamaConfig.attention``; ``self_attention``'s hand-written backward is tuned for
  XLA:CPU."""
  h, kv = n_heads, n_kv_heads
  if qkv_BTNK.ndim == 4:
    qk_BTNK = apply_rope(qkv_BTNK[:, :, :h + kv], cos_BT1F, sin_BT1F)
    q, k, v = qk_BTNK[:, :, :h], qk_BTNK[:, :, h:], qkv_BTNK[:, :, h + kv:]
  else:   # grouped, [B, T, G, R + 2, K]: each group's queries, then its key and its value
    b, t, _, c, hd = qkv_BTNK.shape
    qk = apply_rope(qkv_BTNK[:, :, :, :c - 1], cos_BT1F[:, :, None], sin_BT1F[:, :, None])
    q, k, v = qk[:, :, :, :c - 2].reshape(b, t, h, hd), qk[:, :, :, c - 2], qkv_BTNK[:, :, :, c - 1]
  out = jax.nn.dot_product_attention(q, k, v, mask=(bias_BTS == 0)[:, None])
  return out.astype(qkv_BTNK.dtype)


# Self-attention processes queries in blocks of this many time steps; block ``[t0, t1)`` attends
# only keys ``< t1`` (the later ones are masked by causality), so the blocks above the diagonal of
# the score matrix are never computed: 3/8 of the attention matmuls and softmax for 4 blocks.
ATTENTION_BLOCK = 64


def _query_blocks(t: int):
  return [(t0, min(t0 + ATTENTION_BLOCK, t)) for t0 in range(0, t, ATTENTION_BLOCK)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def self_attention(qkv_BTNK, cos_BT1F, sin_BT1F, bias_BTS, n_heads: int, n_kv_heads: int):
  """Causal grouped-query self-attention from the fused projection ``qkv_BTNK = [q heads | k heads
  | v heads]`` (``[B, T, H + 2G, K]``): RoPE, ``1/sqrt(K)`` scaling, softmax with the additive
  ``bias_BTS`` (which must mask every key after its query), output ``[B, T, H, K]`` in ``qkv``'s
  dtype. The ``cos``/``sin`` tables (``rope_tables``) and the bias get no gradient.

  The backward is written out, flash-attention style (``rowsum(dO * O)`` in place of
  ``rowsum(dP * P)``, the saved unnormalised probabilities), and returns the ``qkv`` gradient in
  one piece, RoPE's transpose and the head-major-to-token-major transposes fused in.

  >>> qkv = jnp.ones((1, 3, 4, 2))  # 2 query heads, 1 kv head
  >>> cos, sin = rope_tables(jnp.arange(3)[None], 2, 10000.0)
  >>> bias = jnp.where(jnp.tril(jnp.ones((3, 3), bool)), 0.0, -1e30)[None]
  >>> self_attention(qkv, cos, sin, bias, 2, 1).shape
  (1, 3, 2, 2)
  """
  return _self_attention_fwd(qkv_BTNK, cos_BT1F, sin_BT1F, bias_BTS, n_heads, n_kv_heads)[0]


def _self_attention_fwd(qkv_BTNK, cos_BT1F, sin_BT1F, bias_BTS, n_heads, n_kv_heads):
  q_BGQK, k_BGSK, v_BGSK = heads(qkv_BTNK, cos_BT1F, sin_BT1F, n_heads, n_kv_heads)
  r = n_heads // q_BGQK.shape[1]    # query heads per group (grouped: per group of the layout)
  outs, ps, inv_ls = [], [], []
  for t0, t1 in _query_blocks(qkv_BTNK.shape[1]):
    out, p, inv_l = softmax_attend(q_BGQK[:, :, t0 * r:t1 * r], k_BGSK[:, :, :t1],
                                    v_BGSK[:, :, :t1], bias_BTS[:, t0:t1, :t1])
    outs.append(out.astype(qkv_BTNK.dtype))
    ps.append(p)
    inv_ls.append(inv_l)
  out_BGQK = jnp.concatenate(outs, axis=2)
  if qkv_BTNK.ndim == 5:   # grouped: RoPE's tables as they apply there, [B, T, 1, 1, F]
    cos_BT1F, sin_BT1F = cos_BT1F[:, :, None], sin_BT1F[:, :, None]
  residuals = (q_BGQK, k_BGSK, v_BGSK, cos_BT1F, sin_BT1F, bias_BTS, out_BGQK, ps, inv_ls)
  return merge_heads(out_BGQK, n_heads), residuals


def _self_attention_bwd(n_heads, n_kv_heads, residuals, d_out_BTHK):
  q, k, v, cos, sin, bias, out, ps, inv_ls = residuals
  b, g, _, hd = q.shape
  t = bias.shape[1]
  r = n_heads // g
  dt = v.dtype
  f32 = dict(preferred_element_type=jnp.float32)
  d_out = d_out_BTHK.astype(jnp.float32).reshape(b, t, g, r, hd).transpose(0, 2, 1, 3, 4)
  d_out = d_out.reshape(b, g, t * r, hd)
  row_dot = jnp.sum(d_out * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_qs, d_k, d_v = [], 0.0, 0.0
  for (t0, t1), p, inv_l in zip(_query_blocks(t), ps, inv_ls):
    rows = slice(t0 * r, t1 * r)
    # With P = p / l: dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)).
    d_out_scaled = (d_out[:, :, rows] * inv_l).astype(dt)
    d_v_blk = jnp.einsum("bgqs,bgqk->bgsk", p.astype(dt), d_out_scaled, **f32)
    d_p = jnp.einsum("bgqk,bgsk->bgqs", d_out_scaled, v[:, :, :t1], **f32)
    d_scores = (p * (d_p - row_dot[:, :, rows] * inv_l)).astype(dt)
    d_qs.append(jnp.einsum("bgqs,bgsk->bgqk", d_scores, k[:, :, :t1], **f32))
    d_k_blk = jnp.einsum("bgqs,bgqk->bgsk", d_scores, q[:, :, rows], **f32)
    pad = ((0, 0), (0, 0), (0, t - t1), (0, 0))
    d_v = d_v + jnp.pad(d_v_blk, pad)
    d_k = d_k + jnp.pad(d_k_blk, pad)
  d_q = jnp.concatenate(d_qs, axis=2) / np.sqrt(hd).astype(np.float32)
  d_q, d_k, d_v = merge_heads(d_q, n_heads), d_k.transpose(0, 2, 1, 3), d_v.transpose(0, 2, 1, 3)
  grouped = cos.ndim == 5   # the projection came grouped, [B, T, G, R + 2, K]
  if grouped:
    d_q, d_k, d_v = d_q.reshape(b, t, g, r, hd), d_k[:, :, :, None], d_v[:, :, :, None]
  axis = 3 if grouped else 2
  d_qk = _unrope(jnp.concatenate([d_q, d_k], axis=axis), cos, sin)
  d_qkv = jnp.concatenate([d_qk, d_v], axis=axis).astype(dt)
  if grouped:
    cos = sin = cos[:, :, 0]
  return d_qkv, jnp.zeros_like(cos), jnp.zeros_like(sin), jnp.zeros_like(bias)


self_attention.defvjp(_self_attention_fwd, _self_attention_bwd)
