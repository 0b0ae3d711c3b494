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
((1, 4, 32), (1, 1, 8, 8))
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gamejax.models.kernels import (ATTENTION_IMPLEMENTATIONS, attention_bias, attention_mask,
                                    cached_attention, cached_bias, dense, group_qkv, qkv_groups,
                                    init_kv_cache, library_attention, self_attention, swiglu)
from gamejax.models import fusion, kernels, logprobs, partitioning
from gamejax.models import remat as remat_lib
from gamejax.models.partitioning import constrain

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
  gamejax.models.llama.LlamaConfigError: LlamaConfig.d_model=130 must be divisible by LlamaConfig.n_heads=4 (or set head_dim)
  """
  vocab_size: int = 320
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 2
  d_ff: int = 344
  rope_theta: float = 10000.0
  # Llama 3's RoPE scaling, (factor, low_freq_factor, high_freq_factor,
  # original_max_position_embeddings); () for none (``kernels.rope_frequencies``).
  rope_scaling: tuple = ()
  # RoPE's frequencies computed on the host as transformers computes them (bit-identical); False:
  # in the compiled graph (XLA's pow, up to an ulp off), as the shipped experiments' models were
  # trained, so that their figures reproduce (experiments/models/*.gin set it).
  rope_on_host: bool = True
  # Per-head width; 0: ``d_model // n_heads``. Qwen3 sets it apart from ``d_model``.
  head_dim: int = 0
  # Biases on the q, k and v projections (Qwen2); an RMSNorm over ``head_dim`` on each query and
  # key head before RoPE (Qwen3).
  qkv_bias: bool = False
  qk_norm: bool = False
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  init_std: float = 0.02
  # What each block keeps for the backward pass ("none", "full", "dots"; ``gamejax.models.remat``).
  remat: str = "none"
  # Positions per block of the LM head when payoffs read token log-probs (``lm.bind``,
  # ``gamejax.models.logprobs``): the ``[B, T, V]`` logits are never held; 0: all at once.
  logits_chunk: int = 0
  # Training attention: "gamejax" (``kernels.self_attention``, a hand-written backward tuned for
  # XLA:CPU) or "dot_product_attention" (``jax.nn.dot_product_attention``: XLA's, or cuDNN's
  # flash attention on a GPU where it applies). Decoding always runs ``kernels.cached_attention``.
  attention: str = "gamejax"

  def __post_init__(self):
    name_of = type(self).__name__
    problem = remat_lib.check(name_of, self.remat) or logprobs.check(name_of, self.logits_chunk)
    if problem:
      raise LlamaConfigError(problem)
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise LlamaConfigError(f"{name_of}.attention={self.attention!r} must be one of "
                             f"{ATTENTION_IMPLEMENTATIONS}")
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "head_dim"):
      value = getattr(self, name)
      if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
          or value < (0 if name == "head_dim" else 1)):
        raise LlamaConfigError(f"{name_of}.{name}={value!r} must be a positive integer")
    for name in ("rope_theta", "norm_eps", "init_std"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise LlamaConfigError(f"{name_of}.{name}={value!r} must be a positive number")
    scaling = tuple(self.rope_scaling)
    if scaling and not (len(scaling) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in scaling)
                        and scaling[2] > scaling[1]):
      raise LlamaConfigError(f"{name_of}.rope_scaling={self.rope_scaling!r} must be () or "
                             "(factor, low_freq_factor, high_freq_factor, "
                             "original_max_position_embeddings), all positive, high > low")
    object.__setattr__(self, "rope_scaling", scaling)
    if not self.head_dim:
      if self.d_model % self.n_heads:
        raise LlamaConfigError(f"{name_of}.d_model={self.d_model} must be divisible by "
                               f"{name_of}.n_heads={self.n_heads} (or set head_dim)")
      object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
    if self.n_heads % self.n_kv_heads:
      raise LlamaConfigError(f"{name_of}.n_heads={self.n_heads} must be divisible by "
                             f"{name_of}.n_kv_heads={self.n_kv_heads}")
    if self.head_dim % 2:
      raise LlamaConfigError(f"{name_of}.head_dim={self.head_dim} must be even for RoPE")
    for name in ("dtype", "param_dtype"):
      value = getattr(self, name)
      if value not in _FLOAT_DTYPES:
        raise LlamaConfigError(f"{name_of}.{name}={value!r} must be one of {_FLOAT_DTYPES}")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)


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


def tensor_groups(cfg: LlamaConfig) -> int:
  """The groups the attention's q | k | v heads are read in under the active tensor parallelism
  (``kernels.qkv_groups``; 0: stacked, as stored). With more devices than kv heads each device
  attends with its own copy of its kv head, and the KV cache holds that many (``init_cache``)."""
  return qkv_groups(cfg.n_heads, cfg.n_kv_heads, partitioning.split_count("qkv_heads"))


class Attention(nn.Module):
  """Grouped-query attention; query head ``h`` uses kv head ``h // (n_heads // n_kv_heads)``;
  optional q/k/v biases (``qkv_bias``) and per-head q/k RMSNorm before RoPE (``qk_norm``).

  ``q``, ``k`` and ``v`` come from one GEMM, their weights stored as one: ``wqkv [D, H + 2G,
  K]`` holds ``wq | wk | wv`` (``fused_storage``; checkpoints see the three), so that no step
  concatenates them (one bigger matmul runs faster on CPU than three small ones). Under tensor
  parallelism (``partitioning.split_count``) the forward reads it regrouped by kv head, ``[D,
  G, R + 2, K]`` (``kernels.group_qkv``; ``tensor_groups``: with more devices than kv heads, one
  group per device, its queries with a copy of their kv head), so that each device's slice of
  the GEMM is whole groups: their queries, key and value. (In even chunks of the stored
  order a device would hold other devices' heads, and XLA would move q, k and v between them.)
  """
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x_BTD, rope_BT, bias_BTS, kv_cache=None, cache_index=None):
    cfg = self.cfg
    d, h, kv, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    init = nn.initializers.normal(cfg.init_std)
    wqkv = self.param("wqkv", init, (d, h + 2 * kv, k), cfg.weight_dtype)
    wo = self.param("wo", init, (h, k, d), cfg.weight_dtype)
    dt = cfg.compute_dtype
    b, t = x_BTD.shape[:2]

    b_qkv = (self.param("qkv_bias", nn.initializers.zeros, (h + 2 * kv, k), cfg.weight_dtype)
             if cfg.qkv_bias else None)
    groups = tensor_groups(cfg)
    if groups:
      # Tensor parallelism: the heads regrouped by kv head (``group_qkv``), so that each device
      # computes and attends whole groups; the weight moves between devices, not q, k and v.
      # Along the heads axis (3 here): each group's queries end at r, its key at r + 1.
      r = h // groups
      wqkv = constrain(group_qkv(wqkv, h, kv, axis=1, groups=groups),
                       ("embed", "kv_heads", None, "head_dim"))
      b_qkv = None if b_qkv is None else group_qkv(b_qkv, h, kv, axis=0, groups=groups)
      shape, axis, q_end, k_end = (b, t, groups, r + 2, k), 3, r, r + 1
    else:   # as stored: along axis 2, the queries end at h, the keys at h + kv
      shape, axis, q_end, k_end = (b, t, h + 2 * kv, k), 2, h, h + kv
    qkv_BTNK = dense(x_BTD.astype(dt), wqkv.reshape(d, -1)).reshape(shape)
    if groups:
      qkv_BTNK = constrain(qkv_BTNK, ("batch", "length", "kv_heads", None, "head_dim"))
    if b_qkv is not None:
      qkv_BTNK = qkv_BTNK + b_qkv.astype(dt)[None, None]
    if cfg.qk_norm:
      part = functools.partial(jax.lax.slice_in_dim, qkv_BTNK, axis=axis)
      qkv_BTNK = jnp.concatenate([RMSNorm(cfg, name="q_norm")(part(0, q_end)),
                                  RMSNorm(cfg, name="k_norm")(part(q_end, k_end)),
                                  part(k_end, None)], axis=axis)
    if kv_cache is None:
      attend = self_attention if cfg.attention == "gamejax" else library_attention
      out_BTHK = attend(qkv_BTNK, *rope_BT, bias_BTS, h, kv)
      new_cache = None
    else:
      out_BTHK, new_cache = cached_attention(qkv_BTNK, *rope_BT, bias_BTS, kv_cache,
                                             cache_index, h, kv)
    out_BTHK = constrain(out_BTHK, ("batch", "length", "heads", "head_dim"))
    return dense(out_BTHK.reshape(b, t, h * k), wo.reshape(h * k, d)), new_cache


class MLP(nn.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``, gate and up as one GEMM, their weights stored as
  one: ``w_gate_up [D, 2, F]`` holds ``w_gate`` and ``w_up`` (``fused_storage``); under tensor
  parallelism two GEMMs, each over a device's slice of ``F``."""
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    d, f = cfg.d_model, cfg.d_ff
    init = nn.initializers.normal(cfg.init_std)
    w_gate_up = self.param("w_gate_up", init, (d, 2, f), cfg.weight_dtype)
    w_down = self.param("w_down", init, (f, d), cfg.weight_dtype)
    x_BTD = x_BTD.astype(cfg.compute_dtype)
    if partitioning.split_count("mlp") > 1:
      # Tensor parallelism splits F: [D, 2F] would not be split as [D, 2, F] is (each device
      # holds a slice of gate and of up), so gate and up are two GEMMs over each device's slice.
      gate_BTF, up_BTF = (constrain(dense(x_BTD, w_gate_up[:, i]), ("batch", "length", "mlp"))
                          for i in (0, 1))
      hidden_BTF = kernels.silu_times(gate_BTF, up_BTF)
    else:
      hidden_BTF = swiglu(dense(x_BTD, w_gate_up.reshape(d, 2 * f)))
    return dense(constrain(hidden_BTF, ("batch", "length", "mlp")), w_down)


class Block(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x_BTD, rope_BT, bias_BTS, kv_cache=None, cache_index=None):
    attn_BTD, new_cache = Attention(self.cfg, name="attn")(
        RMSNorm(self.cfg, name="attn_norm")(x_BTD), rope_BT, bias_BTS, kv_cache, cache_index)
    x_BTD = x_BTD + attn_BTD
    x_BTD = x_BTD + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x_BTD))
    return constrain(x_BTD, ("batch", "length", "embed")), new_cache


class Llama(nn.Module):
  """The decoder. ``cache=None``: full forward; else the KV-cached forward (see ``apply_with_cache``).

  ``hidden_only``: the full forward stops after the final norm and returns the hidden states
  ``[B, T, D]`` (no LM head; see ``hidden``).
  """
  cfg: LlamaConfig
  hidden_only: bool = False
  trained: bool = False     # a cached forward that is differentiated: blocks rematerialise

  @nn.compact
  def __call__(self, tokens_BT, positions_BT, segment_ids_BT, cache=None, cache_index=None,
               rope=None, bias=None):
    cfg = self.cfg
    t = tokens_BT.shape[1]
    embedding = self.param("embedding", nn.initializers.normal(cfg.init_std),
                           (cfg.vocab_size, cfg.d_model), cfg.weight_dtype)
    # The lookup reads the table gathered over fsdp (as FSDP gathers every weight before use).
    x_BTD = jnp.take(constrain(embedding, ("vocab", None)), tokens_BT, axis=0).astype(
        cfg.compute_dtype)
    x_BTD = constrain(x_BTD, ("batch", "length", "embed"))

    # Shared by every layer: the mask as an additive bias, and the RoPE tables (either may come
    # computed ahead: ``apply_with_cache``'s ``bias`` and ``rope``).
    if cache is None:
      slots_T = jnp.arange(t, dtype=jnp.int32)
      bias_BTS = attention_bias(attention_mask(segment_ids_BT, slots_T, segment_ids_BT, slots_T))
    else:
      bias_BTS, k_segment_BS = cached_bias(segment_ids_BT, cache["segment_ids"], cache_index, bias)
    # Tables computed here go through a product with the identity (exact, and a fusion boundary):
    # else XLA fuses their cos/sin into every layer's RoPE and evaluates them once per head and
    # channel.
    rope_BT = rope
    if rope_BT is None:
      eye = jnp.eye(cfg.head_dim // 2, dtype=jnp.float32)
      rope_BT = tuple(jnp.einsum("btnf,fg->btng", x, eye, precision="highest")
                      for x in rope_tables(cfg, positions_BT))

    new_layers = []
    block = remat_lib.block_class(Block, cfg.remat,
                                  decoding=cache is not None and not self.trained)
    for i in range(cfg.n_layers):
      layer_cache = None if cache is None else cache["layers"][i]
      x_BTD, new_layer = block(cfg, name=f"block_{i}")(
          x_BTD, rope_BT, bias_BTS, layer_cache, cache_index)
      new_layers.append(new_layer)
    x_BTD = RMSNorm(cfg, name="final_norm")(x_BTD)
    if self.hidden_only:
      if cache is None:
        return x_BTD
      return x_BTD, {"layers": tuple(new_layers), "segment_ids": k_segment_BS}

    # A tied model has an ``lm_head`` only when ``decode_params`` made one: the embedding's
    # transpose, the same weights.
    if cfg.tie_embeddings and not self.has_variable("params", "lm_head"):
      logits_BTV = dense(x_BTD, embedding, 1, jnp.float32)
    else:
      lm_head = self.param("lm_head", nn.initializers.normal(cfg.init_std),
                           (cfg.d_model, cfg.vocab_size), cfg.weight_dtype)
      logits_BTV = dense(x_BTD, lm_head, 0, jnp.float32)
    logits_BTV = constrain(logits_BTV, ("batch", "length", "vocab"))
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

  Weights are ``N(0, init_std**2)``, RMSNorm scales 1 and biases 0, as the modules' own initializers
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
  # Drawn in the standard layout (``wq``, ``wk``, ... in their tree order), then fused: the same
  # values as before the weights were stored fused.
  specs = fused_storage(cfg)
  standard = jax.eval_shape(lambda: fusion.unfuse(jax.tree.map(
      lambda x: jnp.zeros(x.shape, x.dtype), _param_shapes(cfg)), specs))
  return fusion.fuse(single_draw_init(standard, rng, cfg.init_std,
                                      {"scale": 1, "q_bias": 0, "k_bias": 0, "v_bias": 0}), specs)


def fused_storage(cfg: LlamaConfig) -> tuple[fusion.Fused, ...]:
  """The weights stored fused (``gamejax.models.fusion``): ``attn/wqkv [D, H + 2G, K] = wq | wk
  | wv`` (and ``attn/qkv_bias [H + 2G, K]`` with ``qkv_bias``), ``mlp/w_gate_up [D, 2, F]``
  stacking ``w_gate`` and ``w_up``. Checkpoints, PARAM_AXES' standard names and LoRA targets see
  the standard layout.

  >>> cfg = LlamaConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)
  >>> params = init_params(cfg, jax.random.key(0))
  >>> {k: v.shape for k, v in params["block_0"]["attn"].items()}
  {'wo': (2, 8, 16), 'wqkv': (16, 4, 8)}
  >>> {k: v.shape for k, v in unfuse(cfg, params)["block_0"]["attn"].items()}
  {'wo': (2, 8, 16), 'wq': (16, 2, 8), 'wk': (16, 1, 8), 'wv': (16, 1, 8)}
  """
  h, kv = cfg.n_heads, cfg.n_kv_heads
  specs = [fusion.Fused("wqkv", ("wq", "wk", "wv"), axis=1, sizes=(h, kv, kv)),
           fusion.Fused("w_gate_up", ("w_gate", "w_up"), axis=1)]
  if cfg.qkv_bias:
    specs.append(fusion.Fused("qkv_bias", ("q_bias", "k_bias", "v_bias"), axis=0,
                              sizes=(h, kv, kv)))
  return tuple(specs)


def fuse(cfg: LlamaConfig, params: Params) -> Params:
  """Params as stored (``fused_storage``) from the standard layout."""
  return fusion.fuse(params, fused_storage(cfg))


def unfuse(cfg: LlamaConfig, params: Params) -> Params:
  """Params in the standard layout (``wq``, ``wk``, ``wv``, ``w_gate``, ``w_up``, separate
  biases) from the stored ones; ``fuse`` inverts it."""
  return fusion.unfuse(params, fused_storage(cfg))


def single_draw_init(shapes, rng, std: float, constants) -> Params:
  """Params of the abstract ``shapes`` tree: a leaf whose name is in ``constants`` filled with
  that value, every other one ``N(0, std**2)``, all sliced in order from ONE normal draw (one
  threefry to compile instead of one per weight). Every family's ``init_params`` uses it."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  constant = [constants.get(path[-1].key) for path, _ in leaves]
  total = sum(int(np.prod(x.shape)) for (_, x), c in zip(leaves, constant) if c is None)
  flat = jax.random.normal(rng, (total,), jnp.float32) * std
  out, offset = [], 0
  for (_, x), c in zip(leaves, constant):
    if c is not None:
      out.append(jnp.full(x.shape, c, x.dtype))
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


def hidden(cfg: LlamaConfig, params: Params, tokens_BT, positions_BT, segment_ids_BT):
  """The trunk: ``float32[B, T, D]`` hidden states after the final RMSNorm (what the LM head reads).

  The same modules as ``apply`` without the LM head, so ``params`` may lack ``"lm_head"``; a
  reward model puts its own head on these (``gamejax.models.reward``).

  >>> cfg = LlamaConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)
  >>> ones = np.ones((2, 3), np.int32)
  >>> hidden(cfg, init_params(cfg, jax.random.key(0)), ones, ones - 1, ones).shape
  (2, 3, 16)
  """
  _check_inputs(tokens_BT, positions_BT, segment_ids_BT)
  x_BTD = Llama(cfg, hidden_only=True).apply({"params": params}, tokens_BT, positions_BT,
                                             segment_ids_BT)
  return x_BTD.astype(jnp.float32)


def lm_head(cfg: LlamaConfig, params: Params, hidden_BTD):
  """``float32[B, T, V]``: the LM head on trunk states (``hidden``), as ``apply`` ends (a tied
  model's ``decode_params`` hold the embedding's transpose as ``lm_head``: read as the cached
  forward reads it)."""
  x_BTD = jnp.asarray(hidden_BTD).astype(cfg.compute_dtype)
  if "lm_head" in params:
    logits_BTV = dense(x_BTD, params["lm_head"], 0, jnp.float32)
  else:
    logits_BTV = dense(x_BTD, params["embedding"], 1, jnp.float32)
  return constrain(logits_BTV, ("batch", "length", "vocab"))


def init_cache(cfg: LlamaConfig, batch: int, max_len: int) -> Cache:
  """An empty KV cache: ``{"layers": ({"k": [B, n_kv_heads, head_dim, S], "v": [B, n_kv_heads,
  S, head_dim]}, ...), "segment_ids": int32[B, S]}``; a slot with segment 0 is empty (or padding)
  and never attended. Head-major, keys transposed: as the attention GEMMs read them
  (``kernels.init_kv_cache``). Under tensor parallelism over more devices than kv heads, one
  copy of its kv head per device (``tensor_groups``).

  >>> cfg = LlamaConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32)
  >>> cache = init_cache(cfg, batch=3, max_len=10)
  >>> len(cache["layers"]), cache["layers"][0]["v"].shape, cache["segment_ids"].shape
  (2, (3, 1, 10, 8), (3, 10))
  """
  if batch < 1 or max_len < 1:
    raise ValueError(f"init_cache needs batch >= 1 and max_len >= 1; got batch={batch}, "
                     f"max_len={max_len}")
  kv = max(cfg.n_kv_heads, tensor_groups(cfg))
  return {"layers": tuple(init_kv_cache(batch, kv, max_len, cfg.head_dim,
                                       cfg.compute_dtype) for _ in range(cfg.n_layers)),
          "segment_ids": jnp.zeros((batch, max_len), jnp.int32)}


def decode_params(cfg: LlamaConfig, params: Params) -> Params:
  """``params`` for many cached steps: on XLA:CPU a tied model gets its embedding's transpose as
  an ``lm_head [D, V]``, materialised once, so that every step's LM-head GEMM reads its weight as
  it lies (XLA:CPU repacks an operand it reads transposed on every call; the embedding ``[V,
  D]`` is one). Other backends read either layout: their params are returned as they are.

  >>> cfg = LlamaConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)
  >>> params = init_params(cfg, jax.random.key(0))
  >>> decode_params(cfg, params)["lm_head"].shape == (16, 32) or jax.default_backend() != "cpu"
  True
  """
  return with_transposed_head(params) if cfg.tie_embeddings else params


def with_transposed_head(params: Params) -> Params:
  """A tied model's params with, on XLA:CPU, ``lm_head = embedding.T`` materialised (every
  family's ``decode_params`` for a tied head: Llama's, GPT-2's); other backends, or params that
  already have one, as they are."""
  if jax.default_backend() == "cpu" and "lm_head" not in params:
    return {**params, "lm_head": params["embedding"].T}
  return params


def rope_tables(cfg: LlamaConfig, positions_BT):
  """RoPE's ``(cos, sin)`` at ``positions``, each ``float32[B, T, 1, head_dim/2]``: what a forward
  computes from the positions, and what ``apply_with_cache(rope=)`` takes computed ahead."""
  return kernels.rope_tables(positions_BT, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling,
                             cfg.rope_on_host)


def apply_with_cache(cfg: LlamaConfig, params: Params, tokens_BT, positions_BT, segment_ids_BT,
                     cache: Cache, cache_index, *, rope=None, bias=None, trained: bool = False,
                     hidden: bool = False):
  """KV-cached forward: writes the ``T`` new tokens' keys/values at slots ``cache_index ..
  cache_index + T - 1`` (the same for every row) and returns ``(float32[B, T, V] logits, cache)``.

  Each query attends every cached slot ``<=`` its own that holds its segment, so prefill
  (``T`` = prompt length, ``cache_index=0``) followed by decode steps (``T=1``) gives the logits of
  the full forward on the whole sequence. ``cache_index`` may be traced; ``cache_index + T`` must
  not exceed the cache length (``dynamic_update_slice`` would clamp the write). See the module
  docstring for an example.

  A decode loop can compute ahead what does not depend on the step's activations: ``rope``, the
  ``rope_tables`` of ``positions_BT`` (then not computed here), and ``bias``, the additive
  attention bias ``float32[B, T, S]`` (then the cache's segment ids are neither read nor
  written: the caller tracks which slots each query sees; see ``kernels.cached_bias``).
  ``trained``: the forward is differentiated (``gamejax.models.shared_prompt``), and its blocks
  rematerialise as ``cfg.remat`` says, as the full forward's do (a decode never does).
  ``hidden``: the final norm's states ``[B, T, D]`` in place of the logits (``lm_head`` on them
  gives the logits).
  """
  _check_inputs(tokens_BT, positions_BT, segment_ids_BT)
  b, t = jnp.shape(tokens_BT)
  b_cache, s = cache["segment_ids"].shape
  if b_cache != b or t > s:
    raise ValueError(f"cache of batch {b_cache}, length {s} cannot take tokens of shape {(b, t)}")
  return Llama(cfg, hidden_only=hidden, trained=trained).apply(
      {"params": params}, tokens_BT, positions_BT, segment_ids_BT, cache, cache_index, rope, bias)


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


# ---------------------------------------------------------------------------------------------
# The family's Hugging Face names (``transformers.LlamaForCausalLM``), read and written by
# ``gamejax.interop.hf``.

Config = LlamaConfig
HF_ARCHITECTURES = ("LlamaForCausalLM",)

# The logical names of each parameter's dimensions, by the end of its path (Qwen2 and Qwen3 share
# them); ``gamejax.sharding.RULES`` maps the names to mesh axes.
PARAM_AXES = {
    "embedding": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "attn/wqkv": ("embed", "qkv_heads", "head_dim"),
    "attn/qkv_bias": ("qkv_heads", "head_dim"),
    "mlp/w_gate_up": ("embed", None, "mlp"),
    # The standard layout's (checkpoints, LoRA): each a part of a fused weight as stored.
    "attn/wq": ("embed", "heads", "head_dim"),
    "attn/wk": ("embed", "kv_heads", "head_dim"),
    "attn/wv": ("embed", "kv_heads", "head_dim"),
    "attn/wo": ("heads", "head_dim", "embed"),
    "attn/q_bias": ("heads", "head_dim"),
    "attn/k_bias": ("kv_heads", "head_dim"),
    "attn/v_bias": ("kv_heads", "head_dim"),
    "attn/q_norm/scale": ("head_dim",),
    "attn/k_norm/scale": ("head_dim",),
    "mlp/w_gate": ("embed", "mlp"),
    "mlp/w_up": ("embed", "mlp"),
    "mlp/w_down": ("mlp", "embed"),
    "attn_norm/scale": ("embed",),
    "mlp_norm/scale": ("embed",),
    "final_norm/scale": ("embed",),
}


@dataclasses.dataclass(frozen=True)
class HFTensor:
  """One checkpoint tensor: its HF name and shape, where it lives in gamejax's params, and how it
  is laid out. ``linear``: HF stores ``[out, in]`` (``nn.Linear``); gamejax stores the transpose
  reshaped to ``shape`` (heads split out); otherwise the same values reshaped (a bias split into
  heads). ``conv1d``: a dense weight HF stores ``[in, out]`` (GPT-2's ``Conv1D``). Dense weights
  (either kind) are what LoRA adapts."""
  name: str
  path: tuple[str, ...]
  hf_shape: tuple[int, ...]
  shape: tuple[int, ...]
  linear: bool
  conv1d: bool = False

  @property
  def dense(self) -> bool:
    return self.linear or self.conv1d

  @property
  def in_out(self) -> tuple[int, int]:
    """A dense weight's ``(in_features, out_features)``."""
    return tuple(self.hf_shape[::-1]) if self.linear else tuple(self.hf_shape)

  def to_gamejax(self, x):
    return (x.T if self.linear else x).reshape(self.shape)

  def to_hf(self, x):
    return x.reshape(self.hf_shape[::-1]).T if self.linear else x.reshape(self.hf_shape)


def hf_tensors(cfg: LlamaConfig) -> list[HFTensor]:
  """Every tensor of the HF checkpoint of ``cfg``, in HF's order (no ``lm_head.weight`` when the
  embeddings are tied: HF does not save it)."""
  d, h, kv, k, f, v = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
  out = [HFTensor("model.embed_tokens.weight", ("embedding",), (v, d), (v, d), False)]
  for i in range(cfg.n_layers):
    hf, ours = f"model.layers.{i}.", (f"block_{i}",)
    out += [
        HFTensor(hf + "self_attn.q_proj.weight", ours + ("attn", "wq"), (h * k, d), (d, h, k), True),
        HFTensor(hf + "self_attn.k_proj.weight", ours + ("attn", "wk"), (kv * k, d), (d, kv, k), True),
        HFTensor(hf + "self_attn.v_proj.weight", ours + ("attn", "wv"), (kv * k, d), (d, kv, k), True),
        HFTensor(hf + "self_attn.o_proj.weight", ours + ("attn", "wo"), (d, h * k), (h, k, d), True),
    ]
    if cfg.qkv_bias:
      out += [HFTensor(hf + f"self_attn.{x}_proj.bias", ours + ("attn", f"{x}_bias"), (n * k,),
                       (n, k), False) for x, n in (("q", h), ("k", kv), ("v", kv))]
    if cfg.qk_norm:
      out += [HFTensor(hf + f"self_attn.{x}_norm.weight", ours + ("attn", f"{x}_norm", "scale"),
                       (k,), (k,), False) for x in ("q", "k")]
    out += [
        HFTensor(hf + "mlp.gate_proj.weight", ours + ("mlp", "w_gate"), (f, d), (d, f), True),
        HFTensor(hf + "mlp.up_proj.weight", ours + ("mlp", "w_up"), (f, d), (d, f), True),
        HFTensor(hf + "mlp.down_proj.weight", ours + ("mlp", "w_down"), (d, f), (f, d), True),
        HFTensor(hf + "input_layernorm.weight", ours + ("attn_norm", "scale"), (d,), (d,), False),
        HFTensor(hf + "post_attention_layernorm.weight", ours + ("mlp_norm", "scale"), (d,), (d,),
                 False),
    ]
  out.append(HFTensor("model.norm.weight", ("final_norm", "scale"), (d,), (d,), False))
  if not cfg.tie_embeddings:
    out.append(HFTensor("lm_head.weight", ("lm_head",), (v, d), (d, v), True))
  return out


def config_from_hf(hf: dict, **overrides) -> LlamaConfig:
  """The ``LlamaConfig`` of an HF ``config.json`` (a dict); ``overrides`` (e.g. ``dtype``) win.
  Features the family does not implement (attention or MLP biases, an activation other than
  SiLU, a RoPE type other than default and llama3) raise ``LlamaConfigError`` naming the key."""
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      raise LlamaConfigError(f"config.json: {key}=true is not supported by the llama family")
  return decoder_config(LlamaConfig, hf, **overrides)


def decoder_config(config_class, hf: dict, **overrides):
  """A ``config_class`` (``LlamaConfig`` or a subclass) from the fields that Llama-style HF
  configs share; ``overrides`` win."""
  family = config_class.__name__
  def need(key):
    if key not in hf:
      raise LlamaConfigError(f"config.json has no {key!r}")
    return hf[key]

  if hf.get("hidden_act", "silu") != "silu":
    raise LlamaConfigError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported by "
                           f"{family} (silu)")
  if hf.get("use_sliding_window"):
    raise LlamaConfigError(f"config.json: use_sliding_window=true is not supported by {family}")
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind == "llama3":
    scaling = (float(rope["factor"]), float(rope["low_freq_factor"]),
               float(rope["high_freq_factor"]), int(rope["original_max_position_embeddings"]))
  elif kind == "default":
    scaling = ()
  else:
    raise LlamaConfigError(f"config.json: rope type {kind!r} is not supported (default, llama3)")
  fields = dict(vocab_size=need("vocab_size"), d_model=need("hidden_size"),
                n_layers=need("num_hidden_layers"), n_heads=need("num_attention_heads"),
                n_kv_heads=hf.get("num_key_value_heads") or need("num_attention_heads"),
                head_dim=hf.get("head_dim") or 0, d_ff=need("intermediate_size"),
                rope_theta=float(theta), rope_scaling=scaling,
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
  return config_class(**{**fields, **overrides})


def config_to_hf(cfg: LlamaConfig) -> dict:
  """The HF ``config.json`` (a dict) of ``cfg``; ``config_from_hf`` inverts it."""
  if cfg.qkv_bias or cfg.qk_norm:
    raise LlamaConfigError("a Llama checkpoint has no q/k/v biases or q/k norms; export this "
                           "model as Qwen2Config / Qwen3Config")
  return {**decoder_hf(cfg), "architectures": list(HF_ARCHITECTURES), "model_type": "llama",
          "attention_bias": False, "mlp_bias": False}


def decoder_hf(cfg: LlamaConfig) -> dict:
  """The HF config fields that Llama-style families share (``decoder_config`` inverts them)."""
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling:
    factor, low, high, original = cfg.rope_scaling
    rope.update(rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                original_max_position_embeddings=original)
  return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
          "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
          "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
          "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
          "rope_theta": cfg.rope_theta, "rope_parameters": rope,
          "rope_scaling": rope if cfg.rope_scaling else None,
          "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": cfg.param_dtype}


# The family's GGUF names (llama.cpp's ``convert_hf_to_gguf``), read by ``gamejax.interop.gguf``.
GGUF_ARCHITECTURE = "llama"
_GGUF_LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                     "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                     "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                     "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                     "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf_name: str) -> str:
  """The GGUF tensor name of an HF one (``model.layers.3.mlp.up_proj.weight`` ->
  ``blk.3.ffn_up.weight``)."""
  top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
         "output_norm.weight", "lm_head.weight": "output.weight"}
  if hf_name in top:
    return top[hf_name]
  _, _, layer, rest = hf_name.split(".", 3)
  module, _, kind = rest.rpartition(".")
  return f"blk.{layer}.{_GGUF_LAYER_NAMES[module]}.{kind}"


def from_gguf_layout(cfg: LlamaConfig, hf_name: str, x):
  """An HF-layout array from its GGUF one: llama.cpp stores q and k with each head's rows
  interleaved (pairs ``(i, i + K/2)`` adjacent, for its RoPE); this undoes that permutation."""
  if hf_name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
    heads = cfg.n_heads if ".q_proj." in hf_name else cfg.n_kv_heads
    rows = x.shape[0]
    return x.reshape(heads, rows // heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
  return x


def config_from_gguf(meta: dict, tied: bool, **overrides) -> LlamaConfig:
  """The ``LlamaConfig`` of a GGUF file's metadata (``llama.*`` keys); ``tied``: the file has no
  ``output.weight``."""
  def need(key):
    if f"llama.{key}" not in meta:
      raise LlamaConfigError(f"GGUF metadata has no 'llama.{key}'")
    return meta[f"llama.{key}"]

  d, h = int(need("embedding_length")), int(need("attention.head_count"))
  if int(meta.get("llama.rope.dimension_count", d // h)) != d // h:
    raise LlamaConfigError("GGUF llama.rope.dimension_count != embedding_length / head_count: "
                           "partial RoPE is not supported by the llama family")
  if meta.get("llama.rope.scaling.type", "none") not in ("none",):
    raise LlamaConfigError(f"GGUF llama.rope.scaling.type={meta['llama.rope.scaling.type']!r} "
                           "is not supported")
  vocab = meta.get("llama.vocab_size") or len(meta["tokenizer.ggml.tokens"])
  fields = dict(vocab_size=int(vocab), d_model=d, n_layers=int(need("block_count")), n_heads=h,
                n_kv_heads=int(meta.get("llama.attention.head_count_kv", h)),
                d_ff=int(need("feed_forward_length")),
                rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
                norm_eps=float(need("attention.layer_norm_rms_epsilon")), tie_embeddings=tied)
  return LlamaConfig(**{**fields, **overrides})
