"""Qwen2 (HF ``Qwen2ForCausalLM``): the Llama decoder with biases on the q, k and v projections.

The forward passes are ``gamejax.models.llama``'s (``Qwen2Config`` turns on ``qkv_bias``); this
file holds the config and the Hugging Face names.

>>> cfg = Qwen2Config(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)
>>> [t.name for t in hf_tensors(cfg)][1:5]
['model.layers.0.self_attn.q_proj.weight', 'model.layers.0.self_attn.k_proj.weight', \
'model.layers.0.self_attn.v_proj.weight', 'model.layers.0.self_attn.o_proj.weight']
>>> [t.name for t in hf_tensors(cfg)][5]
'model.layers.0.self_attn.q_proj.bias'
"""
from __future__ import annotations

import dataclasses

from gamejax.models.llama import (LlamaConfig, LlamaConfigError, apply, apply_with_cache,  # noqa: F401
                                  decode_params, decoder_config, decoder_hf, flops_per_token,
                                  fused_storage, hf_tensors, hidden, init_cache, init_params, lm_head,
                                  matmul_params, param_count, rope_tables)


@dataclasses.dataclass(frozen=True)
class Qwen2Config(LlamaConfig):
  """``LlamaConfig`` with Qwen2's defaults: q/k/v biases, RoPE base 1e6, RMSNorm eps 1e-6."""
  qkv_bias: bool = True
  rope_theta: float = 1e6
  norm_eps: float = 1e-6


Config = Qwen2Config
HF_ARCHITECTURES = ("Qwen2ForCausalLM",)


def config_from_hf(hf: dict, **overrides) -> Qwen2Config:
  """The ``Qwen2Config`` of an HF ``config.json`` (a dict); ``overrides`` win."""
  if hf.get("mlp_bias"):
    raise LlamaConfigError("config.json: mlp_bias=true is not supported by Qwen2")
  return decoder_config(Qwen2Config, hf, qkv_bias=True, **overrides)


def config_to_hf(cfg: Qwen2Config) -> dict:
  """The HF ``config.json`` (a dict) of ``cfg``."""
  if not cfg.qkv_bias or cfg.qk_norm or cfg.rope_scaling:
    raise LlamaConfigError("a Qwen2 checkpoint has q/k/v biases, no q/k norm and no RoPE scaling")
  return {**decoder_hf(cfg), "architectures": list(HF_ARCHITECTURES), "model_type": "qwen2",
          "use_sliding_window": False, "sliding_window": None}
