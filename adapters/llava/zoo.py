"""Models built from config (no downloads): tiny ones for tests and demos, 7B-shaped ones for benches.

Random weights: these exercise the plumbing and measure speed, they do not answer questions.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

from .processing import anyres_pinpoints, build_next_processor, build_processor, preset_kwargs

#: name -> (vision config kwargs, text config kwargs)
PRESETS: dict[str, tuple[dict, dict]] = {
    # 112 px / patch 14 -> an 8x8 grid of 64 visual tokens; 2-layer 64-d Llama
    "tiny": (
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             image_size=112, patch_size=14, projection_dim=32),
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=2048),
    ),
    # LLaVA-1.5-7B widths: CLIP ViT-L/14-336 (24 layers, 576 tokens) and a 4096-wide Llama (Vicuna-7B)
    "llava-1.5-7b-shape": (
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
             image_size=336, patch_size=14, projection_dim=768),
        dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, max_position_embeddings=4096),
    ),
}


#: anyres presets (LLaVA-NeXT): a preset name of PRESETS plus "-next"
NEXT_PRESETS = {"tiny-next": "tiny", "llava-next-7b-shape": "llava-1.5-7b-shape"}


def llava_config(preset: str = "tiny", llm_layers: int | None = None, vision_layers: int | None = None,
                 attn: str = "sdpa") -> LlavaConfig | LlavaNextConfig:
    """A `LlavaConfig` (or `LlavaNextConfig` for NEXT_PRESETS) with the byte tokenizer's vocabulary."""
    if preset in NEXT_PRESETS:
        cfg = llava_config(NEXT_PRESETS[preset], llm_layers, vision_layers, attn)
        nxt = LlavaNextConfig(
            vision_config=cfg.vision_config, text_config=cfg.text_config, image_token_id=cfg.image_token_id,
            vision_feature_layer=-2, vision_feature_select_strategy="default",
            image_grid_pinpoints=anyres_pinpoints(cfg.vision_config.image_size),
        )
        nxt._attn_implementation = attn
        return nxt
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join([*PRESETS, *NEXT_PRESETS])}")
    vkw, tkw, tok = preset_kwargs(*PRESETS[preset], llm_layers, vision_layers)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**vkw),
        text_config=LlamaConfig(**tkw),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    cfg._attn_implementation = attn
    return cfg


def build_llava(preset: str = "tiny", seed: int = 0, attn: str = "sdpa", dtype: torch.dtype = torch.float32,
                llm_layers: int | None = None, vision_layers: int | None = None
                ) -> LlavaForConditionalGeneration | LlavaNextForConditionalGeneration:
    """A random-weight LLaVA (or LLaVA-NeXT for NEXT_PRESETS) from a preset, deterministic in `seed`."""
    cfg = llava_config(preset, llm_layers=llm_layers, vision_layers=vision_layers, attn=attn)
    torch.manual_seed(seed)
    cls = LlavaNextForConditionalGeneration if preset in NEXT_PRESETS else LlavaForConditionalGeneration
    model = cls(cfg).to(dtype).eval()
    model.generation_config.pad_token_id = cfg.text_config.pad_token_id
    return model


def build_llava_with_processor(preset: str = "tiny", **kwargs):
    """(model, processor) for a preset; the processor expands `<image>` to the model's token count."""
    model = build_llava(preset, **kwargs)
    vc = model.config.vision_config
    if preset in NEXT_PRESETS:
        return model, build_next_processor(vc.image_size, vc.patch_size, model.config.image_grid_pinpoints)
    return model, build_processor(vc.image_size, vc.patch_size)
