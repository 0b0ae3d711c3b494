"""GPT-2 (HF ``GPT2LMHeadModel``) in flax.linen, with a full (training) path and a KV-cached path.

Architecture: token embedding plus a learned position embedding, ``n_layers`` pre-norm blocks
(LayerNorm -> multi-head causal attention -> residual; LayerNorm -> GELU MLP -> residual), a final
LayerNorm and the LM head, which is always the transposed token embedding. Every projection and
LayerNorm has a bias; no dropout (the checkpoint's ``*_pdrop`` are ignored).

The position embedding is read at the per-token ``positions`` given, which restart at 0 for each
packed segment, so a packed transcript is embedded as it would be alone; attention is causal and
restricted to the query's segment exactly as in ``gamejax.models.llama`` (segment 0 is padding).
Positions must be below ``max_positions``: past it the embedding lookup gives NaN (no clamping).

The attention kernels are the Llama family's (``gamejax.models.kernels``): GPT-2 has no RoPE, so
they get the identity rotation (cos = 1, sin = 0, which leaves every value bit-for-bit as it is)
and the training path keeps ``self_attention``'s hand-written backward.

>>> import jax, numpy as np
>>> cfg = GPT2Config(vocab_size=32, d_model=16, n_layers=1, n_heads=2, max_positions=8)
>>> params = init_params(cfg, jax.random.key(0))
>>> sorted(params), sorted(params["block_0"]["attn"])
(['block_0', 'embedding', 'final_norm', 'position_embedding'], ['b_qkv', 'bo', 'w_qkv', 'wo'])
>>> tokens = np.array([[1, 5, 6, 7]], np.int32)
>>> positions = np.arange(4, dtype=np.int32)[None]
>>> segments = np.ones((1, 4), np.int32)
>>> apply(cfg, params, tokens, positions, segments).shape
(1, 4, 32)
>>> cache = init_cache(cfg, batch=1, max_len=8)
>>> logits, cache = apply_with_cache(cfg, params, tokens, positions, segments, cache, 0)
>>> logits.shape, cache["layers"][0]["k"].shape
((1, 4, 32), (1, 2, 8, 8))
>>> [(t.name, t.hf_shape) for t in hf_tensors(cfg)][3:5]
[('transformer.h.0.ln_1.bias', (16,)), ('transformer.h.0.attn.c_attn.weight', (16, 48))]
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gamejax.models.kernels import (attention_bias, attention_mask, cached_attention, cached_bias,
                                    dense, init_kv_cache, self_attention)
from gamejax.models import logprobs, partitioning
from gamejax.models import remat as remat_lib
from gamejax.models.partitioning import constrain
from gamejax.models.llama import HFTensor, single_draw_init, with_transposed_head
from gamejax.models.llama import lm_head as _llama_lm_head

Params = Any
Cache = dict

_FLOAT_DTYPES = ("float32", "bfloat16", "float16")
# HF ``activation_function`` -> whether it is the tanh approximation of GELU (else exact, erf).
ACTIVATIONS = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu": False}


class GPT2ConfigError(ValueError):
  """A ``GPT2Config`` field (or an HF GPT-2 config key) has a value the model cannot be built
  with."""


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """Hyper-parameters of GPT-2. Frozen and hashable, so it can be a static jit argument.

  ``dtype`` is the compute dtype of activations and matmul inputs (matmuls accumulate in float32;
  LayerNorm, GELU and softmax run in float32); ``param_dtype`` is the storage dtype of the
  weights. ``d_ff=0`` means ``4 * d_model`` (HF's ``n_inner=None``). ``activation`` is HF's
  ``activation_function``: ``gelu_new`` / ``gelu_pytorch_tanh`` (tanh approximation, GPT-2's) or
  ``gelu`` (exact). The LM head is always tied to the token embedding.

  >>> GPT2Config(d_model=128, n_heads=4).d_ff, GPT2Config(d_model=128, n_heads=4).head_dim
  (512, 32)
  >>> GPT2Config(activation="relu")
  Traceback (most recent call last):
  ...
  gamejax.models.gpt2.GPT2ConfigError: GPT2Config.activation='relu' must be one of ['gelu', 'gelu_new', 'gelu_pytorch_tanh']
  """
  vocab_size: int = 320
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  d_ff: int = 0
  max_positions: int = 1024
  norm_eps: float = 1e-5
  activation: str = "gelu_new"
  dtype: str = "float32"
  param_dtype: str = "float32"
  init_std: float = 0.02
  # What each block keeps for the backward pass ("none", "full", "dots"; ``gamejax.models.remat``).
  remat: str = "none"
  # Positions per block of the LM head when payoffs read token log-probs (``lm.bind``,
  # ``gamejax.models.logprobs``): the ``[B, T, V]`` logits are never held; 0: all at once.
  logits_chunk: int = 0

  def __post_init__(self):
    name_of = type(self).__name__
    problem = remat_lib.check(name_of, self.remat) or logprobs.check(name_of, self.logits_chunk)
    if problem:
      raise GPT2ConfigError(problem)
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_positions"):
      value = getattr(self, name)
      if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
          or value < (0 if name == "d_ff" else 1)):
        raise GPT2ConfigError(f"{name_of}.{name}={value!r} must be a positive integer")
    for name in ("norm_eps", "init_std"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise GPT2ConfigError(f"{name_of}.{name}={value!r} must be a positive number")
    if self.activation not in ACTIVATIONS:
      raise GPT2ConfigError(f"{name_of}.activation={self.activation!r} must be one of "
                            f"{sorted(ACTIVATIONS)}")
    if self.d_model % self.n_heads:
      raise GPT2ConfigError(f"{name_of}.d_model={self.d_model} must be divisible by "
                            f"{name_of}.n_heads={self.n_heads}")
    if self.head_dim % 2:
      raise GPT2ConfigError(f"{name_of}.d_model / n_heads = {self.head_dim} must be even (the "
                            "attention kernels split heads in halves)")
    for name in ("dtype", "param_dtype"):
      value = getattr(self, name)
      if value not in _FLOAT_DTYPES:
        raise GPT2ConfigError(f"{name_of}.{name}={value!r} must be one of {_FLOAT_DTYPES}")
    if not self.d_ff:
      object.__setattr__(self, "d_ff", 4 * self.d_model)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def tie_embeddings(self) -> bool:
    """GPT-2's LM head is always the token embedding (read by ``gamejax.interop.hf``)."""
    return True

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)


# ---------------------------------------------------------------------------------------------
# Modules.

class LayerNorm(nn.Module):
  """LayerNorm with scale and bias, statistics in float32, output in the compute dtype."""
  cfg: GPT2Config

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,), self.cfg.weight_dtype)
    bias = self.param("bias", nn.initializers.zeros, (d,), self.cfg.weight_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centred = x32 - mean
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(var + self.cfg.norm_eps)
    shape = (1,) * (x.ndim - 1) + (d,)
    y = y * scale.astype(jnp.float32).reshape(shape) + bias.astype(jnp.float32).reshape(shape)
    return y.astype(self.cfg.compute_dtype)


def _bias(b, ndim: int, dtype):
  return b.astype(dtype).reshape((1,) * (ndim - b.ndim) + b.shape)


class Attention(nn.Module):
  """Multi-head attention: ``q | k | v`` from one GEMM (HF's ``c_attn``, weight ``[d, 3, h, k]``),
  output projection ``wo`` (HF's ``c_proj``), each with a bias; scores scaled by ``1/sqrt(k)``."""
  cfg: GPT2Config

  @nn.compact
  def __call__(self, x_BTD, identity_BT, bias_BTS, kv_cache=None, cache_index=None):
    cfg = self.cfg
    d, h, k = cfg.d_model, cfg.n_heads, cfg.head_dim
    init, zeros = nn.initializers.normal(cfg.init_std), nn.initializers.zeros
    w_qkv = self.param("w_qkv", init, (d, 3, h, k), cfg.weight_dtype)
    b_qkv = self.param("b_qkv", zeros, (3, h, k), cfg.weight_dtype)
    wo = self.param("wo", init, (h, k, d), cfg.weight_dtype)
    bo = self.param("bo", zeros, (d,), cfg.weight_dtype)
    dt = cfg.compute_dtype
    b, t = x_BTD.shape[:2]

    if partitioning.split_count("heads") > 1:
      # Tensor parallelism splits the heads: each head's q, k and v side by side (the attention
      # kernels' grouped layout, one kv head per group), so that a device's slice of the GEMM's
      # output is its heads' q, k and v; [D, 3HK] would interleave the devices' heads.
      w_DHCK = constrain(w_qkv.transpose(0, 2, 1, 3), ("embed", "heads", None, "head_dim"))
      qkv_BTNK = constrain(dense(x_BTD.astype(dt), w_DHCK.reshape(d, 3 * h * k)).reshape(
          b, t, h, 3, k), ("batch", "length", "heads", None, "head_dim"))
      qkv_BTNK = qkv_BTNK + _bias(b_qkv.transpose(1, 0, 2), 5, dt)
    else:
      qkv_BTNK = dense(x_BTD.astype(dt), w_qkv.reshape(d, 3 * h * k)).reshape(b, t, 3 * h, k)
      qkv_BTNK = qkv_BTNK + _bias(b_qkv.reshape(3 * h, k), 4, dt)
    if kv_cache is None:
      out_BTHK = self_attention(qkv_BTNK, *identity_BT, bias_BTS, h, h)
      new_cache = None
    else:
      out_BTHK, new_cache = cached_attention(qkv_BTNK, *identity_BT, bias_BTS, kv_cache,
                                             cache_index, h, h)
    out_BTHK = constrain(out_BTHK, ("batch", "length", "heads", "head_dim"))
    out_BTD = dense(out_BTHK.reshape(b, t, h * k), wo.reshape(h * k, d)) + _bias(bo, 3, dt)
    return out_BTD, new_cache


def gelu(x, tanh_approximation: bool):
  """GELU in float32, result in ``x``'s dtype: HF's ``gelu_new`` (tanh approximation) or
  ``gelu`` (exact, erf)."""
  return jax.nn.gelu(x.astype(jnp.float32), approximate=tanh_approximation).astype(x.dtype)


class MLP(nn.Module):
  """``c_proj(gelu(c_fc(x)))``, each projection with a bias."""
  cfg: GPT2Config

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    init, zeros = nn.initializers.normal(cfg.init_std), nn.initializers.zeros
    w_fc = self.param("w_fc", init, (cfg.d_model, cfg.d_ff), cfg.weight_dtype)
    b_fc = self.param("b_fc", zeros, (cfg.d_ff,), cfg.weight_dtype)
    w_proj = self.param("w_proj", init, (cfg.d_ff, cfg.d_model), cfg.weight_dtype)
    b_proj = self.param("b_proj", zeros, (cfg.d_model,), cfg.weight_dtype)
    dt = cfg.compute_dtype
    hidden_BTF = dense(x_BTD.astype(dt), w_fc) + _bias(b_fc, 3, dt)
    hidden_BTF = constrain(gelu(hidden_BTF, ACTIVATIONS[cfg.activation]),
                           ("batch", "length", "mlp"))
    return dense(hidden_BTF, w_proj) + _bias(b_proj, 3, dt)


class Block(nn.Module):
  cfg: GPT2Config

  @nn.compact
  def __call__(self, x_BTD, identity_BT, bias_BTS, kv_cache=None, cache_index=None):
    attn_BTD, new_cache = Attention(self.cfg, name="attn")(
        LayerNorm(self.cfg, name="ln_1")(x_BTD), identity_BT, bias_BTS, kv_cache, cache_index)
    x_BTD = x_BTD + attn_BTD
    x_BTD = x_BTD + MLP(self.cfg, name="mlp")(LayerNorm(self.cfg, name="ln_2")(x_BTD))
    return constrain(x_BTD, ("batch", "length", "embed")), new_cache


class GPT2(nn.Module):
  """The decoder. ``cache=None``: full forward; else the KV-cached forward (``apply_with_cache``).
  ``hidden_only``: the full forward stops after the final LayerNorm (``hidden``)."""
  cfg: GPT2Config
  hidden_only: bool = False
  trained: bool = False     # a cached forward that is differentiated: blocks rematerialise

  @nn.compact
  def __call__(self, tokens_BT, positions_BT, segment_ids_BT, cache=None, cache_index=None,
               bias=None):
    cfg = self.cfg
    b, t = tokens_BT.shape
    init = nn.initializers.normal(cfg.init_std)
    embedding = self.param("embedding", init, (cfg.vocab_size, cfg.d_model), cfg.weight_dtype)
    position_embedding = self.param("position_embedding", init,
                                    (cfg.max_positions, cfg.d_model), cfg.weight_dtype)
    # The lookups read the tables gathered over fsdp (as FSDP gathers every weight before use).
    token_table = constrain(embedding, ("vocab", None))
    position_table = constrain(position_embedding, (None, None))
    x_BTD = (jnp.take(token_table, tokens_BT, axis=0).astype(jnp.float32)
             + jnp.take(position_table, positions_BT, axis=0).astype(jnp.float32))
    x_BTD = constrain(x_BTD.astype(cfg.compute_dtype), ("batch", "length", "embed"))

    if cache is None:
      slots_T = jnp.arange(t, dtype=jnp.int32)
      bias_BTS = attention_bias(attention_mask(segment_ids_BT, slots_T, segment_ids_BT, slots_T))
    else:
      bias_BTS, k_segment_BS = cached_bias(segment_ids_BT, cache["segment_ids"], cache_index, bias)
    # No RoPE: the kernels rotate by angle 0 (cos = 1, sin = 0), which is exact.
    half = (b, t, 1, cfg.head_dim // 2)
    identity_BT = (jnp.ones(half, jnp.float32), jnp.zeros(half, jnp.float32))

    new_layers = []
    block = remat_lib.block_class(Block, cfg.remat,
                                  decoding=cache is not None and not self.trained)
    for i in range(cfg.n_layers):
      layer_cache = None if cache is None else cache["layers"][i]
      x_BTD, new_layer = block(cfg, name=f"block_{i}")(
          x_BTD, identity_BT, bias_BTS, layer_cache, cache_index)
      new_layers.append(new_layer)
    x_BTD = LayerNorm(cfg, name="final_norm")(x_BTD)
    if self.hidden_only:
      if cache is None:
        return x_BTD
      return x_BTD, {"layers": tuple(new_layers), "segment_ids": k_segment_BS}
    if self.has_variable("params", "lm_head"):    # ``decode_params``: the embedding's transpose
      head = self.param("lm_head", init, (cfg.d_model, cfg.vocab_size), cfg.weight_dtype)
      logits_BTV = dense(x_BTD, head, 0, jnp.float32)
    else:
      logits_BTV = dense(x_BTD, embedding, 1, jnp.float32)
    logits_BTV = constrain(logits_BTV, ("batch", "length", "vocab"))
    if cache is None:
      return logits_BTV
    return logits_BTV, {"layers": tuple(new_layers), "segment_ids": k_segment_BS}


def _check_inputs(tokens_BT, positions_BT, segment_ids_BT):
  shapes = {"tokens_BT": jnp.shape(tokens_BT), "positions_BT": jnp.shape(positions_BT),
            "segment_ids_BT": jnp.shape(segment_ids_BT)}
  if len(shapes["tokens_BT"]) != 2 or len(set(shapes.values())) != 1:
    raise ValueError(f"tokens, positions and segment ids must all be [B, T]; got {shapes}")


# Parameters initialised to a constant (LayerNorm scales 1, biases 0); all others N(0, init_std).
_CONSTANT = {"scale": 1, "bias": 0, "b_qkv": 0, "bo": 0, "b_fc": 0, "b_proj": 0}


def init_params(cfg: GPT2Config, rng) -> Params:
  """Initial parameters (a nested dict of arrays): weights and both embeddings ``N(0,
  init_std**2)``, LayerNorm scales 1, biases 0; every weight is sliced from ONE normal draw (as
  ``llama.init_params``: one threefry to compile, not one per weight).

  >>> cfg = GPT2Config(vocab_size=32, d_model=16, n_layers=1, n_heads=2, max_positions=8)
  >>> p = init_params(cfg, jax.random.key(0))
  >>> sorted(p["block_0"]), p["block_0"]["attn"]["w_qkv"].shape, p["block_0"]["ln_2"]["scale"][:2]
  (['attn', 'ln_1', 'ln_2', 'mlp'], (16, 3, 2, 8), Array([1., 1.], dtype=float32))
  """
  return _init_params(cfg, rng)


def _param_shapes(cfg: GPT2Config):
  dummy = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda: GPT2(cfg).init(jax.random.key(0), dummy, dummy, dummy + 1))[
      "params"]


@functools.partial(jax.jit, static_argnums=0)
def _init_params(cfg: GPT2Config, rng) -> Params:
  return single_draw_init(_param_shapes(cfg), rng, cfg.init_std, _CONSTANT)


def apply(cfg: GPT2Config, params: Params, tokens_BT, positions_BT, segment_ids_BT):
  """Full forward: ``float32[B, T, V]`` next-token logits at every position.

  ``positions_BT`` restart at 0 per segment (and index the position embedding); ``segment_ids_BT``
  are 1, 2, ... per packed transcript and 0 for padding. See the module docstring for an example.
  """
  _check_inputs(tokens_BT, positions_BT, segment_ids_BT)
  return GPT2(cfg).apply({"params": params}, tokens_BT, positions_BT, segment_ids_BT)


def hidden(cfg: GPT2Config, params: Params, tokens_BT, positions_BT, segment_ids_BT):
  """The trunk: ``float32[B, T, D]`` hidden states after the final LayerNorm (what the LM head
  reads).

  >>> cfg = GPT2Config(vocab_size=32, d_model=16, n_layers=1, n_heads=2, max_positions=8)
  >>> ones = np.ones((2, 3), np.int32)
  >>> hidden(cfg, init_params(cfg, jax.random.key(0)), ones, ones - 1, ones).shape
  (2, 3, 16)
  """
  _check_inputs(tokens_BT, positions_BT, segment_ids_BT)
  x_BTD = GPT2(cfg, hidden_only=True).apply({"params": params}, tokens_BT, positions_BT,
                                            segment_ids_BT)
  return x_BTD.astype(jnp.float32)


# ``float32[B, T, V]``: the (tied) LM head on trunk states (``hidden``), as ``apply`` ends: Llama's
# (the embedding, or ``decode_params``' transpose of it where the params hold one).
lm_head = _llama_lm_head


def init_cache(cfg: GPT2Config, batch: int, max_len: int) -> Cache:
  """An empty KV cache: ``{"layers": ({"k": [B, n_heads, head_dim, S], "v": [B, n_heads, S,
  head_dim]}, ...), "segment_ids": int32[B, S]}`` (the layout of ``llama.init_cache``); a slot
  with segment 0 is empty (or padding) and never attended.

  >>> cfg = GPT2Config(vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_positions=8)
  >>> cache = init_cache(cfg, batch=3, max_len=10)
  >>> len(cache["layers"]), cache["layers"][0]["v"].shape, cache["segment_ids"].shape
  (2, (3, 2, 10, 8), (3, 10))
  """
  if batch < 1 or max_len < 1:
    raise ValueError(f"init_cache needs batch >= 1 and max_len >= 1; got batch={batch}, "
                     f"max_len={max_len}")
  return {"layers": tuple(init_kv_cache(batch, cfg.n_heads, max_len, cfg.head_dim,
                                       cfg.compute_dtype) for _ in range(cfg.n_layers)),
          "segment_ids": jnp.zeros((batch, max_len), jnp.int32)}


def decode_params(cfg: GPT2Config, params: Params) -> Params:
  """``params`` for many cached steps (``lm.decode_params``): on XLA:CPU the tied LM head as the
  embedding's transpose, ``lm_head [D, V]``, materialised once, so that every decode step's
  LM-head GEMM reads its weight as it lies (as ``llama.decode_params``); other backends get the
  params as they are.

  >>> cfg = GPT2Config(vocab_size=32, d_model=16, n_layers=1, n_heads=2, max_positions=8)
  >>> p = decode_params(cfg, init_params(cfg, jax.random.key(0)))
  >>> p["lm_head"].shape == (16, 32) or jax.default_backend() != "cpu"
  True
  """
  del cfg
  return with_transposed_head(params)


def apply_with_cache(cfg: GPT2Config, params: Params, tokens_BT, positions_BT, segment_ids_BT,
                     cache: Cache, cache_index, *, bias=None, trained: bool = False,
                     hidden: bool = False):
  """KV-cached forward: writes the ``T`` new tokens' keys/values at slots ``cache_index ..
  cache_index + T - 1`` and returns ``(float32[B, T, V] logits, cache)``; prefill then one-token
  steps give the full forward's logits (the semantics of ``llama.apply_with_cache``, whose
  ``bias``, ``trained`` and ``hidden`` this takes too; GPT-2 has no RoPE tables)."""
  _check_inputs(tokens_BT, positions_BT, segment_ids_BT)
  b, t = jnp.shape(tokens_BT)
  b_cache, s = cache["segment_ids"].shape
  if b_cache != b or t > s:
    raise ValueError(f"cache of batch {b_cache}, length {s} cannot take tokens of shape {(b, t)}")
  return GPT2(cfg, hidden_only=hidden, trained=trained).apply(
      {"params": params}, tokens_BT, positions_BT, segment_ids_BT, cache, cache_index, bias)


def param_count(cfg: GPT2Config) -> int:
  """Number of parameters (the tied LM head is counted once, as the embedding).

  >>> cfg = GPT2Config(vocab_size=32, d_model=16, n_layers=1, n_heads=2, max_positions=8)
  >>> param_count(cfg)  # wte 32*16, wpe 8*16, LNs 6*16, attn 16*48+48 + 16*16+16, MLP 2*16*64+64+16
  3952
  """
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(_param_shapes(cfg))))


def matmul_params(cfg: GPT2Config) -> int:
  """Weights that enter a matmul once per token: attention, MLP and the tied LM head (the two
  embedding lookups are gathers)."""
  d = cfg.d_model
  return cfg.n_layers * (4 * d * d + 2 * d * cfg.d_ff) + d * cfg.vocab_size


def flops_per_token(cfg: GPT2Config, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward), for MFU: ``6 * matmul_params(cfg) + 6 *
  n_layers * d_model * seq_len`` (the counting of ``llama.flops_per_token``).

  >>> cfg = GPT2Config(vocab_size=32, d_model=16, n_layers=1, n_heads=2, max_positions=8)
  >>> flops_per_token(cfg, seq_len=8)  # 6 * (1024 + 2048 + 512) + 6 * 1 * 16 * 8
  22272.0
  """
  if seq_len < 1:
    raise ValueError(f"flops_per_token needs seq_len >= 1; got {seq_len}")
  attention = 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len / 2
  return 6.0 * matmul_params(cfg) + attention


# ---------------------------------------------------------------------------------------------
# The family's Hugging Face names (``transformers.GPT2LMHeadModel``), read and written by
# ``gamejax.interop.hf``. HF's ``Conv1D`` stores its weight ``[in, out]``, the layout gamejax
# uses, so every tensor is only reshaped (``linear=False``).

Config = GPT2Config
# The logical names of each parameter's dimensions, by the end of its path
# (``gamejax.sharding.RULES`` maps them to mesh axes).
PARAM_AXES = {
    "embedding": ("vocab", "embed"),
    "position_embedding": ("positions", "embed"),
    "attn/w_qkv": ("embed", "qkv", "heads", "head_dim"),
    "attn/b_qkv": ("qkv", "heads", "head_dim"),
    "attn/wo": ("heads", "head_dim", "embed"),
    "attn/bo": ("embed",),
    "mlp/w_fc": ("embed", "mlp"),
    "mlp/b_fc": ("mlp",),
    "mlp/w_proj": ("mlp", "embed"),
    "mlp/b_proj": ("embed",),
    "ln_1/scale": ("embed",), "ln_1/bias": ("embed",),
    "ln_2/scale": ("embed",), "ln_2/bias": ("embed",),
    "final_norm/scale": ("embed",), "final_norm/bias": ("embed",),
}
HF_ARCHITECTURES = ("GPT2LMHeadModel",)
# The causal-mask buffers that transformers before 4.31 (or so) saved with the weights.
HF_NOT_PARAMETERS = (".attn.bias", ".attn.masked_bias")
# Hub GPT-2 checkpoints (gpt2, distilgpt2, ...) name tensors without the base model's prefix
# (``h.0.attn.c_attn.weight``); ``interop.hf`` reads them under it.
HF_BASE_PREFIX = "transformer."


def hf_tensors(cfg: GPT2Config) -> list[HFTensor]:
  """Every tensor of the HF checkpoint of ``cfg``, in HF's order (no ``lm_head.weight``: it is
  tied, and ``save_pretrained`` does not write it)."""
  d, h, k, f, v = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
  out = [HFTensor("transformer.wte.weight", ("embedding",), (v, d), (v, d), False),
         HFTensor("transformer.wpe.weight", ("position_embedding",), (cfg.max_positions, d),
                  (cfg.max_positions, d), False)]
  for i in range(cfg.n_layers):
    hf, ours = f"transformer.h.{i}.", (f"block_{i}",)
    out += [
        HFTensor(hf + "ln_1.weight", ours + ("ln_1", "scale"), (d,), (d,), False),
        HFTensor(hf + "ln_1.bias", ours + ("ln_1", "bias"), (d,), (d,), False),
        HFTensor(hf + "attn.c_attn.weight", ours + ("attn", "w_qkv"), (d, 3 * d), (d, 3, h, k),
                 False, conv1d=True),
        HFTensor(hf + "attn.c_attn.bias", ours + ("attn", "b_qkv"), (3 * d,), (3, h, k), False),
        HFTensor(hf + "attn.c_proj.weight", ours + ("attn", "wo"), (d, d), (h, k, d), False,
                 conv1d=True),
        HFTensor(hf + "attn.c_proj.bias", ours + ("attn", "bo"), (d,), (d,), False),
        HFTensor(hf + "ln_2.weight", ours + ("ln_2", "scale"), (d,), (d,), False),
        HFTensor(hf + "ln_2.bias", ours + ("ln_2", "bias"), (d,), (d,), False),
        HFTensor(hf + "mlp.c_fc.weight", ours + ("mlp", "w_fc"), (d, f), (d, f), False,
                 conv1d=True),
        HFTensor(hf + "mlp.c_fc.bias", ours + ("mlp", "b_fc"), (f,), (f,), False),
        HFTensor(hf + "mlp.c_proj.weight", ours + ("mlp", "w_proj"), (f, d), (f, d), False,
                 conv1d=True),
        HFTensor(hf + "mlp.c_proj.bias", ours + ("mlp", "b_proj"), (d,), (d,), False),
    ]
  out += [HFTensor("transformer.ln_f.weight", ("final_norm", "scale"), (d,), (d,), False),
          HFTensor("transformer.ln_f.bias", ("final_norm", "bias"), (d,), (d,), False)]
  return out


# HF config keys whose non-default values change the model in ways this family does not implement.
_UNSUPPORTED = {"scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
                "add_cross_attention": False, "scale_attn_weights": True,
                "tie_word_embeddings": True}


def config_from_hf(hf: dict, **overrides) -> GPT2Config:
  """The ``GPT2Config`` of an HF ``config.json`` (a dict); ``overrides`` (e.g. ``dtype``) win.
  Features the family does not implement raise ``GPT2ConfigError`` naming the key.

  >>> config_from_hf({"vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12,
  ...                 "n_positions": 1024}).d_ff
  3072
  >>> config_from_hf({"vocab_size": 8, "n_embd": 8, "n_layer": 1, "n_head": 2,
  ...                 "n_positions": 8, "activation_function": "relu"})
  Traceback (most recent call last):
  ...
  gamejax.models.gpt2.GPT2ConfigError: config.json: activation_function='relu' is not supported by GPT2Config (one of ['gelu', 'gelu_new', 'gelu_pytorch_tanh'])
  """
  def need(key, alias):
    for name in (key, alias):
      if name in hf:
        return hf[name]
    raise GPT2ConfigError(f"config.json has no {key!r}")

  for key, default in _UNSUPPORTED.items():
    if key in hf and bool(hf[key]) != default:
      raise GPT2ConfigError(f"config.json: {key}={hf[key]!r} is not supported by GPT2Config "
                            f"(only {default!r})")
  activation = hf.get("activation_function", "gelu_new")
  if activation not in ACTIVATIONS:
    raise GPT2ConfigError(f"config.json: activation_function={activation!r} is not supported by "
                          f"GPT2Config (one of {sorted(ACTIVATIONS)})")
  fields = dict(vocab_size=need("vocab_size", "vocab_size"), d_model=need("n_embd", "hidden_size"),
                n_layers=need("n_layer", "num_hidden_layers"),
                n_heads=need("n_head", "num_attention_heads"),
                max_positions=need("n_positions", "max_position_embeddings"),
                d_ff=hf.get("n_inner") or 0, activation=activation,
                norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                init_std=float(hf.get("initializer_range", 0.02)))
  return GPT2Config(**{**fields, **overrides})


def config_to_hf(cfg: GPT2Config) -> dict:
  """The HF ``config.json`` (a dict) of ``cfg``; ``config_from_hf`` inverts it.

  >>> cfg = GPT2Config(vocab_size=32, d_model=16, n_layers=1, n_heads=2, max_positions=8)
  >>> config_from_hf(config_to_hf(cfg)) == cfg
  True
  """
  eos = 50256 if cfg.vocab_size > 50256 else None
  return {"architectures": list(HF_ARCHITECTURES), "model_type": "gpt2",
          "vocab_size": cfg.vocab_size, "n_positions": cfg.max_positions, "n_embd": cfg.d_model,
          "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
          "n_inner": None if cfg.d_ff == 4 * cfg.d_model else cfg.d_ff,
          "activation_function": cfg.activation, "layer_norm_epsilon": cfg.norm_eps,
          "initializer_range": cfg.init_std, "scale_attn_weights": True,
          "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
          "add_cross_attention": False, "tie_word_embeddings": True, "dtype": cfg.param_dtype,
          # GPT-2's <|endoftext|> (transformers' default), or none where the vocabulary lacks it.
          "bos_token_id": eos, "eos_token_id": eos}
