"""Adapter for LLaVA-1.5: transformers' `LlavaForConditionalGeneration` (any size, any attention)."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from tokenreduce.adapter import Encoded, PlaceholderAdapter
from tokenreduce.flops import TransformerDims
from tokenreduce.registry import register_adapter


def config_dims(cfg, gated: bool = True, vocab: int = 0) -> TransformerDims:
    """`TransformerDims` of a transformers text or vision config (Llama/Qwen2 gated, CLIP/SigLIP plain)."""
    return TransformerDims(
        hidden=cfg.hidden_size,
        intermediate=cfg.intermediate_size,
        layers=cfg.num_hidden_layers,
        heads=cfg.num_attention_heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        vocab=vocab,
        gated=gated,
    )


@register_adapter("LlavaForConditionalGeneration")
class LlavaAdapter(PlaceholderAdapter):
    """LLaVA-1.5: one CLIP grid per image (24x24 = 576 tokens for CLIP-L/14-336), projected by an MLP.

    Visual tokens: `get_image_features(...).pooler_output`, one (h*w, D) tensor per image, raster order.
    With `vision_feature_select_strategy="full"` the CLS token is kept: the item is then a 1 x (h*w+1) row.
    """

    def encode(self, kwargs: dict[str, Any]) -> Encoded | None:
        pixel_values = kwargs.pop("pixel_values", None)
        mm = kwargs.pop("mm_encoder_outputs", None)
        extra = {k: kwargs.pop(k) for k in ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes")
                 if kwargs.get(k) is not None}
        t0 = time.perf_counter()
        if mm is not None and mm.get("image") is not None:
            feats = mm["image"].pooler_output
        elif pixel_values is not None:
            out = self.model.model.get_image_features(pixel_values=pixel_values, return_dict=True, **extra)
            feats = out.pooler_output
        else:
            return None
        self._handle._sync()
        # pooler_output is a (n_images, tokens, D) tensor or a sequence of (tokens, D) tensors
        feats = list(feats.unbind(0)) if isinstance(feats, torch.Tensor) else list(feats)
        return Encoded(features=feats, grids=[_grid(f.shape[0]) for f in feats], seconds=time.perf_counter() - t0)

    def llm_dims(self) -> TransformerDims:
        tc = self.model.config.text_config
        return config_dims(tc, vocab=tc.vocab_size)

    def vision_dims(self) -> tuple[TransformerDims, int]:
        vc = self.model.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2 + 1
        return config_dims(vc, gated=False), n


def _grid(n: int) -> tuple[int, int]:
    side = math.isqrt(n)
    return (side, side) if side * side == n else (1, n)
