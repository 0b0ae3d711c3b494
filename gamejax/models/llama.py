"""A Llama-style decoder in flax.linen, with a full (training) path and a KV-cached decode path.

Architecture (as in HF ``LlamaForCausalLM``): token embedding, ``n_layers`` pre-norm blocks
(RMSNorm -> grouped-query attention with rotate-half RoPE -> residual; RMSNorm -> SwiGLU MLP ->
residual), a final RMSNorm and an LM head (the transposed embedding when ``tie_embeddings``).
No biases anywhere.

Attention is causal *and* restricted to the query's segment, so transcripts packed in one row
never see each other. Segment 0 is padding: a padding query attends only itself (so no row of the
softmax is empty and nothing turns NaN) and no real query ever attends padding. RoPE rotates by
the per-token ``positions`` given, which restart at 0 for every packed segment.

Both paths run the same modules, so one params tree serves training and decoding:

>>> import jax, numpy as np
>>> cfg = LlamaConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)
>>> params = init_params(cfg, jax.random.key(0))
>>> tokens = np.array([[1, 5, 6, 7]], np.int32)
>>> positions = np.arange(4, dtype=np.int32)[None]
>>> segments = np.ones((1, 4), np.int32)
>>> apply(cfg, params, tokens, positions, segments).shape
(1, 4, 32)
>>> cache = init_cache(cfg, batch=1, max_len=8)
>>> logits, cache = apply_with_cache(cfg, params, tokens, positions, segments, cache, 0)
>>> logits.shape, cache["layers"][0]["k"].shape
((1, 4, 32), (1, 8, 1, 8))
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Params = Any
Cache = dict

_FLOAT_DTYPES = ("float32", "bfloat16", "float16")


class LlamaConfigError(ValueError):
  """A ``LlamaConfig`` field has a value the model cannot be built with."""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyper-parameters of the decoder. Frozen and hashable, so it can be a static jit argument.

  ``dtype`` is the compute dtype of activations and matmul inputs (matmuls accumulate in float32;
  norms, RoPE and softmax run in float32); ``param_dtype`` is the storage dtype of the weights.

  >>> LlamaConfig(d_model=128, n_heads=4).head_dim
  32
  >>> LlamaConfig(d_model=130, n_heads=4)
  Traceback (most recent call last):
  ...
  gamejax.models.llama.LlamaConfigError: LlamaConfig.d_model=130 must be divisible by LlamaConfig.n_heads=4
  """
  vocab_size: int = 320
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 2
  d_ff: int = 344
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  init_std: float = 0.02

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise LlamaConfigError(f"LlamaConfig.{name}={value!r} must be a positive integer")
    for name in ("rope_theta", "norm_eps", "init_std"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise LlamaConfigError(f"LlamaConfig.{name}={value!r} must be a positive number")
    if self.d_model % self.n_heads:
      raise LlamaConfigError(f"LlamaConfig.d_model={self.d_model} must be divisible by "
                             f"LlamaConfig.n_heads={self.n_heads}")
    if self.n_heads % self.n_kv_heads:
      raise LlamaConfigError(f"LlamaConfig.n_heads={self.n_heads} must be divisible by "
                             f"LlamaConfig.n_kv_heads={self.n_kv_heads}")
    if self.head_dim % 2:
      raise LlamaConfigError(f"head_dim = LlamaConfig.d_model/n_heads = {self.head_dim} must be "
                             f"even for RoPE")
    for name in ("dtype", "param_dtype"):
      value = getattr(self, name)
      if value not in _FLOAT_DTYPES:
        raise LlamaConfigError(f"LlamaConfig.{name}={value!r} must be one of {_FLOAT_DTYPES}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)


# ---------------------------------------------------------------------------------------------
# Compute pieces. On CPU the training step is bound by mid-sized GEMMs and memory passes, so the
# pieces whose autodiff backward compiles badly with XLA:CPU have their backward written out
# (``jax.custom_vjp``); tests/test_model.py checks every weight's gradient against finite
# differences of an independent NumPy forward.

def _matmul(x, w, contract_w: int, out_dtype):
  dims = (((x.ndim - 1,), (contract_w,)), ((), ()))
  return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
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
  """
  return _matmul(x, w.astype(x.dtype), contract_w, out_dtype or x.dtype)


def _dense_fwd(x, w, contract_w, out_dtype):
  return dense(x, w, contract_w, out_dtype), (x, w)


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


dense.defvjp(_dense_fwd, _dense_bwd)


@jax.custom_vjp
def swiglu(gate_up_BTF):
  """``silu(gate) * up`` of the fused ``[..., 2F] = [gate | up]`` projection (float32 math,
  result in the input's dtype). The backward writes the ``[..., 2F]`` gradient in one pass.

  >>> swiglu(jnp.ones((2, 3, 8))).shape  # [gate | up], each of width 4
  (2, 3, 4)
  """
  return _swiglu_fwd(gate_up_BTF)[0]


def _swiglu_fwd(gate_up_BTF):
  f = gate_up_BTF.shape[-1] // 2
  gate = gate_up_BTF[..., :f].astype(jnp.float32)
  up = gate_up_BTF[..., f:].astype(jnp.float32)
  return (jax.nn.silu(gate) * up).astype(gate_up_BTF.dtype), gate_up_BTF


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


def rope_tables(positions_BT, head_dim: int, theta: float):
  """``(cos, sin)``, each ``float32[B, T, 1, head_dim/2]``: the RoPE rotation of each position,
  computed once per forward and shared by every layer."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
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


def _heads(qkv_BTNK, cos_BT1F, sin_BT1F, n_heads: int, n_kv_heads: int):
  """Split the fused projection ``[B, T, H + 2G, K]`` into head-major RoPE'd queries scaled by
  ``1/sqrt(K)``, ``[B, G, T*R, K]`` (rows: time, then the ``R = H/G`` query heads of kv head
  ``g``, i.e. head ``h = g*R + r`` as HF's ``repeat_kv``), and RoPE'd keys and values ``[B, G, T,
  K]``, so that both attention matmuls are plain batched GEMMs over ``(b, g)``."""
  b, t, _, k = qkv_BTNK.shape
  h, kv = n_heads, n_kv_heads
  qk = apply_rope(qkv_BTNK[:, :, :h + kv], cos_BT1F, sin_BT1F)
  q = (qk[:, :, :h].astype(jnp.float32) / np.sqrt(k).astype(np.float32)).astype(qkv_BTNK.dtype)
  q_BGQK = q.reshape(b, t, kv, h // kv, k).transpose(0, 2, 1, 3, 4).reshape(b, kv, -1, k)
  return q_BGQK, qk[:, :, h:].transpose(0, 2, 1, 3), qkv_BTNK[:, :, h + kv:].transpose(0, 2, 1, 3)


def _merge_heads(x_BGQK, n_heads: int):
  """``[B, G, T*R, K]`` (rows as in ``_heads``) -> ``[B, T, H, K]``."""
  b, g, q, k = x_BGQK.shape
  r = n_heads // g
  return x_BGQK.reshape(b, g, q // r, r, k).transpose(0, 2, 1, 3, 4).reshape(b, q // r, n_heads, k)


def _softmax_attend(q_BGQK, k_BGSK, v_BGSK, bias_BTS):
  """Attention of ``Q = T*R`` query rows over ``S`` keys per ``(b, g)``, with additive ``bias``;
  float32 scores and softmax. Returns ``(out float32[B, G, Q, K], p float32[B, G, Q, S], 1/l)``
  with ``p`` the unnormalised probabilities and ``l`` their row sums: rows are normalised after
  the ``PV`` matmul, on ``[Q, K]`` rather than ``[Q, S]``."""
  b, g, q, _ = q_BGQK.shape
  t, s = bias_BTS.shape[1:]
  scores = jnp.einsum("bgqk,bgsk->bgqs", q_BGQK, k_BGSK, preferred_element_type=jnp.float32)
  scores = scores.reshape(b, g, t, q // t, s) + bias_BTS[:, None, :, None, :]
  p = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True)).reshape(b, g, q, s)
  inv_l = 1.0 / jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("bgqs,bgsk->bgqk", p.astype(v_BGSK.dtype), v_BGSK,
                   preferred_element_type=jnp.float32) * inv_l
  return out, p, inv_l


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
  r = n_heads // n_kv_heads
  q_BGQK, k_BGSK, v_BGSK = _heads(qkv_BTNK, cos_BT1F, sin_BT1F, n_heads, n_kv_heads)
  outs, ps, inv_ls = [], [], []
  for t0, t1 in _query_blocks(qkv_BTNK.shape[1]):
    out, p, inv_l = _softmax_attend(q_BGQK[:, :, t0 * r:t1 * r], k_BGSK[:, :, :t1],
                                    v_BGSK[:, :, :t1], bias_BTS[:, t0:t1, :t1])
    outs.append(out.astype(qkv_BTNK.dtype))
    ps.append(p)
    inv_ls.append(inv_l)
  out_BGQK = jnp.concatenate(outs, axis=2)
  residuals = (q_BGQK, k_BGSK, v_BGSK, cos_BT1F, sin_BT1F, bias_BTS, out_BGQK, ps, inv_ls)
  return _merge_heads(out_BGQK, n_heads), residuals


def _self_attention_bwd(n_heads, n_kv_heads, residuals, d_out_BTHK):
  q, k, v, cos, sin, bias, out, ps, inv_ls = residuals
  b, g, _, hd = q.shape
  t = bias.shape[1]
  r = n_heads // n_kv_heads
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
  d_qk = _unrope(jnp.concatenate([_merge_heads(d_q, n_heads), d_k.transpose(0, 2, 1, 3)], axis=2),
                 cos, sin)
  d_qkv = jnp.concatenate([d_qk, d_v.transpose(0, 2, 1, 3)], axis=2).astype(dt)
  return d_qkv, jnp.zeros_like(cos), jnp.zeros_like(sin), jnp.zeros_like(bias)


self_attention.defvjp(_self_attention_fwd, _self_attention_bwd)


# ---------------------------------------------------------------------------------------------
# Modules.

class RMSNorm(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.cfg.weight_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
    scale = scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
    return (x32 * scale).astype(self.cfg.compute_dtype)


class Attention(nn.Module):
  """Grouped-query attention; query head ``h`` uses kv head ``h // (n_heads // n_kv_heads)``.

  ``q``, ``k`` and ``v`` come from one GEMM (the three weights concatenated: one bigger matmul
  runs faster on CPU than three small ones).
  """
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x_BTD, rope_BT, bias_BTS, kv_cache=None, cache_index=None):
    cfg = self.cfg
    d, h, kv, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    init = nn.initializers.normal(cfg.init_std)
    wq = self.param("wq", init, (d, h, k), cfg.weight_dtype)
    wk = self.param("wk", init, (d, kv, k), cfg.weight_dtype)
    wv = self.param("wv", init, (d, kv, k), cfg.weight_dtype)
    wo = self.param("wo", init, (h, k, d), cfg.weight_dtype)
    dt = cfg.compute_dtype
    b, t = x_BTD.shape[:2]

    w_qkv = jnp.concatenate([wq, wk, wv], axis=1).reshape(d, (h + 2 * kv) * k)
    qkv_BTNK = dense(x_BTD.astype(dt), w_qkv).reshape(b, t, h + 2 * kv, k)
    if kv_cache is None:
      out_BTHK = self_attention(qkv_BTNK, *rope_BT, bias_BTS, h, kv)
      new_cache = None
    else:
      q_BGQK, k_BGTK, v_BGTK = _heads(qkv_BTNK, *rope_BT, h, kv)
      zero = jnp.zeros((), jnp.int32)
      start = (zero, jnp.asarray(cache_index, jnp.int32), zero, zero)
      k_BSGK = jax.lax.dynamic_update_slice(
          kv_cache["k"], k_BGTK.transpose(0, 2, 1, 3).astype(kv_cache["k"].dtype), start)
      v_BSGK = jax.lax.dynamic_update_slice(
          kv_cache["v"], v_BGTK.transpose(0, 2, 1, 3).astype(kv_cache["v"].dtype), start)
      new_cache = {"k": k_BSGK, "v": v_BSGK}
      out_BGQK, _, _ = _softmax_attend(q_BGQK, k_BSGK.astype(dt).transpose(0, 2, 1, 3),
                                       v_BSGK.astype(dt).transpose(0, 2, 1, 3), bias_BTS)
      out_BTHK = _merge_heads(out_BGQK.astype(dt), h)
    return dense(out_BTHK.reshape(b, t, h * k), wo.reshape(h * k, d)), new_cache


class MLP(nn.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``, gate and up as one GEMM."""
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    init = nn.initializers.normal(cfg.init_std)
    w_gate = self.param("w_gate", init, (cfg.d_model, cfg.d_ff), cfg.weight_dtype)
    w_up = self.param("w_up", init, (cfg.d_model, cfg.d_ff), cfg.weight_dtype)
    w_down = self.param("w_down", init, (cfg.d_ff, cfg.d_model), cfg.weight_dtype)
    dt = cfg.compute_dtype
    gate_up_BTF = dense(x_BTD.astype(dt), jnp.concatenate([w_gate, w_up], axis=1))
    return dense(swiglu(gate_up_BTF), w_down)


class Block(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x_BTD, rope_BT, bias_BTS, kv_cache=None, cache_index=None):
    attn_BTD, new_cache = Attention(self.cfg, name="attn")(
        RMSNorm(self.cfg, name="attn_norm")(x_BTD), rope_BT, bias_BTS, kv_cache, cache_index)
    x_BTD = x_BTD + attn_BTD
    x_BTD = x_BTD + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x_BTD))
    return x_BTD, new_cache


class Llama(nn.Module):
  """The decoder. ``cache=None``: full forward; else the KV-cached forward (see ``apply_with_cache``)."""
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, tokens_BT, positions_BT, segment_ids_BT, cache=None, cache_index=None):
    cfg = self.cfg
    t = tokens_BT.shape[1]
    embedding = self.param("embedding", nn.initializers.normal(cfg.init_std),
                           (cfg.vocab_size, cfg.d_model), cfg.weight_dtype)
    x_BTD = jnp.take(embedding, tokens_BT, axis=0).astype(cfg.compute_dtype)

    if cache is None:
      slots_T = jnp.arange(t, dtype=jnp.int32)
      mask_BTS = attention_mask(segment_ids_BT, slots_T, segment_ids_BT, slots_T)
    else:
      index = jnp.asarray(cache_index, jnp.int32)
      k_segment_BS = jax.lax.dynamic_update_slice(
          cache["segment_ids"], segment_ids_BT.astype(jnp.int32), (jnp.zeros((), jnp.int32), index))
      k_slot_S = jnp.arange(k_segment_BS.shape[1], dtype=jnp.int32)
      mask_BTS = attention_mask(segment_ids_BT, index + jnp.arange(t, dtype=jnp.int32),
                                k_segment_BS, k_slot_S)
    # Shared by every layer: the mask as an additive bias, and the RoPE tables. The tables go
    # through a product with the identity (exact, and a fusion boundary): else XLA fuses their
    # cos/sin into every layer's RoPE and evaluates them once per head and channel.
    bias_BTS = jnp.where(mask_BTS, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
    eye = jnp.eye(cfg.head_dim // 2, dtype=jnp.float32)
    rope_BT = tuple(jnp.einsum("btnf,fg->btng", x, eye, precision="highest")
                    for x in rope_tables(positions_BT, cfg.head_dim, cfg.rope_theta))

    new_layers = []
    for i in range(cfg.n_layers):
      layer_cache = None if cache is None else cache["layers"][i]
      x_BTD, new_layer = Block(cfg, name=f"block_{i}")(
          x_BTD, rope_BT, bias_BTS, layer_cache, cache_index)
      new_layers.append(new_layer)
    x_BTD = RMSNorm(cfg, name="final_norm")(x_BTD)

    if cfg.tie_embeddings:
      logits_BTV = dense(x_BTD, embedding, 1, jnp.float32)
    else:
      lm_head = self.param("lm_head", nn.initializers.normal(cfg.init_std),
                           (cfg.d_model, cfg.vocab_size), cfg.weight_dtype)
      logits_BTV = dense(x_BTD, lm_head, 0, jnp.float32)
    if cache is None:
      return logits_BTV
    return logits_BTV, {"layers": tuple(new_layers), "segment_ids": k_segment_BS}


def _check_inputs(tokens_BT, positions_BT, segment_ids_BT):
  shapes = {"tokens_BT": jnp.shape(tokens_BT), "positions_BT": jnp.shape(positions_BT),
            "segment_ids_BT": jnp.shape(segment_ids_BT)}
  if len(shapes["tokens_BT"]) != 2 or len(set(shapes.values())) != 1:
    raise ValueError(f"tokens, positions and segment ids must all be [B, T]; got {shapes}")


def init_params(cfg: LlamaConfig, rng) -> Params:
  """Initial parameters (the ``"params"`` collection: a nested dict of arrays).

  Weights are ``N(0, init_std**2)`` and RMSNorm scales 1, as the modules' own initializers
  (``Llama(cfg).init``) give; here every weight is sliced from ONE normal draw, so XLA compiles a
  single threefry instead of one per weight (about 5 s -> 0.5 s of compile time on 2 CPU cores).

  >>> cfg = LlamaConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)
  >>> sorted(init_params(cfg, jax.random.key(0)))
  ['block_0', 'embedding', 'final_norm']
  """
  return _init_params(cfg, rng)


def _param_shapes(cfg: LlamaConfig):
  dummy = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda: Llama(cfg).init(jax.random.key(0), dummy, dummy, dummy + 1))[
      "params"]


@functools.partial(jax.jit, static_argnums=0)
def _init_params(cfg: LlamaConfig, rng) -> Params:
  shapes = _param_shapes(cfg)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  is_scale = [path[-1].key == "scale" for path, _ in leaves]
  total = sum(int(np.prod(x.shape)) for (_, x), scale in zip(leaves, is_scale) if not scale)
  flat = jax.random.normal(rng, (total,), jnp.float32) * cfg.init_std
  out, offset = [], 0
  for (_, x), scale in zip(leaves, is_scale):
    if scale:
      out.append(jnp.ones(x.shape, x.dtype))
    else:
      size = int(np.prod(x.shape))
      out.append(flat[offset:offset + size].reshape(x.shape).astype(x.dtype))
      offset += size
  return jax.tree_util.tree_unflatten(treedef, out)


def apply(cfg: LlamaConfig, params: Params, tokens_BT, positions_BT, segment_ids_BT):
  """Full forward: ``float32[B, T, V]`` next-token logits at every position.

  ``positions_BT`` restart at 0 per segment; ``segment_ids_BT`` are 1, 2, ... per packed
  transcript and 0 for padding. See the module docstring for an example.
  """
  _check_inputs(tokens_BT, positions_BT, segment_ids_BT)
  return Llama(cfg).apply({"params": params}, tokens_BT, positions_BT, segment_ids_BT)


def init_cache(cfg: LlamaConfig, batch: int, max_len: int) -> Cache:
  """An empty KV cache: ``{"layers": ({"k", "v"}: [B, S, n_kv_heads, head_dim], ...),
  "segment_ids": int32[B, S]}``; a slot with segment 0 is empty (or padding) and never attended.

  >>> cfg = LlamaConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32)
  >>> cache = init_cache(cfg, batch=3, max_len=10)
  >>> len(cache["layers"]), cache["layers"][0]["v"].shape, cache["segment_ids"].shape
  (2, (3, 10, 1, 8), (3, 10))
  """
  if batch < 1 or max_len < 1:
    raise ValueError(f"init_cache needs batch >= 1 and max_len >= 1; got batch={batch}, "
                     f"max_len={max_len}")
  shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
  layer = lambda: {"k": jnp.zeros(shape, cfg.compute_dtype), "v": jnp.zeros(shape, cfg.compute_dtype)}
  return {"layers": tuple(layer() for _ in range(cfg.n_layers)),
          "segment_ids": jnp.zeros((batch, max_len), jnp.int32)}


def apply_with_cache(cfg: LlamaConfig, params: Params, tokens_BT, positions_BT, segment_ids_BT,
                     cache: Cache, cache_index):
  """KV-cached forward: writes the ``T`` new tokens' keys/values at slots ``cache_index ..
  cache_index + T - 1`` (the same for every row) and returns ``(float32[B, T, V] logits, cache)``.

  Each query attends every cached slot ``<=`` its own that holds its segment, so prefill
  (``T`` = prompt length, ``cache_index=0``) followed by decode steps (``T=1``) gives the logits of
  the full forward on the whole sequence. ``cache_index`` may be traced; ``cache_index + T`` must
  not exceed the cache length (``dynamic_update_slice`` would clamp the write). See the module
  docstring for an example.
  """
  _check_inputs(tokens_BT, positions_BT, segment_ids_BT)
  b, t = jnp.shape(tokens_BT)
  b_cache, s = cache["segment_ids"].shape
  if b_cache != b or t > s:
    raise ValueError(f"cache of batch {b_cache}, length {s} cannot take tokens of shape {(b, t)}")
  return Llama(cfg).apply({"params": params}, tokens_BT, positions_BT, segment_ids_BT, cache,
                          cache_index)


def param_count(cfg: LlamaConfig) -> int:
  """Number of parameters (the tied LM head is counted once, as the embedding).

  >>> cfg = LlamaConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)
  >>> param_count(cfg)  # 32*16 + (2*16 + 16*2*8 + 2*16*1*8 + 2*8*16 + 3*16*32) + 16
  2864
  """
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(_param_shapes(cfg))))


def matmul_params(cfg: LlamaConfig) -> int:
  """Weights that enter a matmul once per token: attention, MLP and the LM head (the embedding
  lookup is a gather, not a matmul, but a tied head multiplies by it once)."""
  d, k = cfg.d_model, cfg.head_dim
  attn = d * cfg.n_heads * k * 2 + d * cfg.n_kv_heads * k * 2
  mlp = 3 * d * cfg.d_ff
  return cfg.n_layers * (attn + mlp) + d * cfg.vocab_size


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward), for MFU.

  ``6 * matmul_params(cfg) + 6 * n_layers * n_heads * head_dim * seq_len``:
  each matmul weight costs 2 FLOPs forward and 4 backward per token; attention's two matmuls
  (``QK^T`` and ``PV``) cost ``2 * 2 * n_heads * head_dim`` FLOPs per attended key forward, times 3
  for training, and under the causal mask a token attends ``seq_len / 2`` keys on average, giving
  ``12 * n_layers * n_heads * head_dim * seq_len / 2``. Norms, RoPE and softmax are not counted.

  >>> cfg = LlamaConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)
  >>> flops_per_token(cfg, seq_len=8)  # 6 * (768 + 1536 + 512) + 6 * 1 * 16 * 8
  17664.0
  """
  if seq_len < 1:
    raise ValueError(f"flops_per_token needs seq_len >= 1; got {seq_len}")
  attention = 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len / 2
  return 6.0 * matmul_params(cfg) + attention
