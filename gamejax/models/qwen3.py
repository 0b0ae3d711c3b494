"""Qwen3 (HF ``Qwen3ForCausalLM``): the Llama decoder with an RMSNorm over each query and key head
before RoPE, and a head width of its own (``head_dim``, not ``d_model / n_heads``).

The forward passes are ``gamejax.models.llama``'s (``Qwen3Config`` turns on ``qk_norm``); this
file holds the config and the Hugging Face names.

>>> cfg = Qwen3Config(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
...                   head_dim=12)
>>> [(t.name, t.hf_shape) for t in hf_tensors(cfg)][1:2]
[('model.layers.0.self_attn.q_proj.weight', (24, 16))]
>>> [t.name for t in hf_tensors(cfg)][5:7]
['model.layers.0.self_attn.q_norm.weight', 'model.layers.0.self_attn.k_norm.weight']
"""
from __future__ import annotations

import dataclasses

from gamejax.models.llama import (LlamaConfig, LlamaConfigError, apply, apply_with_cache,  # noqa: F401
                                  decode_params, decoder_config, decoder_hf, flops_per_token,
                                  fused_storage, hf_tensors, hidden, init_cache, init_params, lm_head,
                                  matmul_params, param_count, rope_tables)


@dataclasses.dataclass(frozen=True)
class Qwen3Config(LlamaConfig):
  """``LlamaConfig`` with Qwen3's defaults: q/k RMSNorm, RoPE base 1e6, RMSNorm eps 1e-6."""
  qk_norm: bool = True
  rope_theta: float = 1e6
  norm_eps: float = 1e-6


Config = Qwen3Config
HF_ARCHITECTURES = ("Qwen3ForCausalLM",)


def config_from_hf(hf: dict, **overrides) -> Qwen3Config:
  """The ``Qwen3Config`` of an HF ``config.json`` (a dict); ``overrides`` win."""
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      raise LlamaConfigError(f"config.json: {key}=true is not supported by Qwen3")
  return decoder_config(Qwen3Config, hf, qk_norm=True, **overrides)


def config_to_hf(cfg: Qwen3Config) -> dict:
  """The HF ``config.json`` (a dict) of ``cfg``."""
  if cfg.qkv_bias or not cfg.qk_norm or cfg.rope_scaling:
    raise LlamaConfigError("a Qwen3 checkpoint has q/k norms, no q/k/v biases and no RoPE scaling")
  return {**decoder_hf(cfg), "architectures": list(HF_ARCHITECTURES), "model_type": "qwen3",
          "attention_bias": False, "use_sliding_window": False, "sliding_window": None}
