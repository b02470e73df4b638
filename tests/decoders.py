"""Tiny seeded decoders (Llama, Qwen2) for the in-LLM engine tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

FAMILIES = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config)}
_CACHE: dict = {}


def tiny(family: str = "llama", attn: str = "sdpa", dtype: torch.dtype = torch.float32):
    """A seeded 4-layer decoder (hidden 64, 4 heads over 2 KV heads); the same weights for every attention."""
    key = (family, attn, dtype)
    if key not in _CACHE:
        model_cls, cfg_cls = FAMILIES[family]
        cfg = cfg_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, initializer_range=0.2, max_position_embeddings=256)
        cfg._attn_implementation = attn
        torch.manual_seed(0)
        model = model_cls(cfg).eval().to(dtype)
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        _CACHE[key] = model
    return _CACHE[key]
