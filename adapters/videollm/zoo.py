"""Video LLMs built from config (no downloads): tiny ones for tests, a 7B-shaped one for benches.

Random weights: they exercise the plumbing and measure speed; they do not answer questions.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
)

from ..llava.processing import preset_kwargs

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   image_size=112, patch_size=14)
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096)

#: name -> (model class, config class, vision config class, vision kwargs, text config class, text kwargs)
PRESETS = {
    "tiny-video-llava": (VideoLlavaForConditionalGeneration, VideoLlavaConfig, CLIPVisionConfig, TINY_VISION,
                         LlamaConfig, TINY_TEXT),
    "tiny-onevision": (LlavaOnevisionForConditionalGeneration, LlavaOnevisionConfig, SiglipVisionConfig,
                       TINY_VISION, Qwen2Config, TINY_TEXT),
    "tiny-next-video": (LlavaNextVideoForConditionalGeneration, LlavaNextVideoConfig, CLIPVisionConfig, TINY_VISION,
                        LlamaConfig, TINY_TEXT),
    # LLaVA-OneVision-7B / LLaVA-Video-7B widths: SigLIP-so400m at 384 px (27 layers, 729 tokens per frame,
    # 196 after pooling) and Qwen2-7B (3584 wide, 28 layers, GQA with 4 KV heads)
    "llava-onevision-7b-shape": (
        LlavaOnevisionForConditionalGeneration, LlavaOnevisionConfig, SiglipVisionConfig,
        dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
             image_size=384, patch_size=14),
        Qwen2Config,
        dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
             num_key_value_heads=4, max_position_embeddings=32768),
    ),
}


def build_video_llm(preset: str = "tiny-onevision", seed: int = 0, attn: str = "sdpa",
                    dtype: torch.dtype = torch.float32, llm_layers: int | None = None,
                    vision_layers: int | None = None):
    """A random-weight video LLM from a preset, deterministic in `seed`; returns (model, tokenizer)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown video preset {preset!r}; choose from {', '.join(PRESETS)}")
    model_cls, cfg_cls, vcls, vkw, tcls, tkw = PRESETS[preset]
    vkw, tkw, tok = preset_kwargs(vkw, tkw, llm_layers, vision_layers)
    ids = dict(image_token_id=tok.convert_tokens_to_ids("<image>"), video_token_id=tok.convert_tokens_to_ids("<video>"))
    extra = {}
    if cfg_cls is LlavaOnevisionConfig:
        s = vkw["image_size"]
        extra = dict(vision_feature_layer=-1, vision_feature_select_strategy="full",
                     image_grid_pinpoints=[[s * i, s * j] for i in range(1, 7) for j in range(1, 7)])
    elif cfg_cls is LlavaNextVideoConfig:
        extra = dict(spatial_pool_stride=2, spatial_pool_mode="average")
    cfg = cfg_cls(vision_config=vcls(**vkw), text_config=tcls(**tkw), **ids, **extra)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = model_cls(cfg).to(dtype).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok
