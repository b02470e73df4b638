"""Adapter for Video-LLaVA: transformers' `VideoLlavaForConditionalGeneration`.

Images go through the image tower like LLaVA-1.5 (CLS dropped). Videos go through the separate video tower;
every frame contributes its CLS token followed by its patch grid (257 tokens for CLIP-L/14-224). The grid
tokens are the frame's items for reducers; the CLS token is an extra token that enters the LLM iff a
token of its frame survives (it summarises the frame and is not counted in budgets).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tokenreduce.adapter import ImageLayout, VisualInputs
from tokenreduce.encoder import TowerRun, VisionTower
from tokenreduce.errors import InputError
from tokenreduce.registry import register_adapter
from tokenreduce.tokens import VisualTokens

from ..llava.llava15 import LlavaAdapter, feature_options, hf_vision_tower
from .common import VideoSpec, frame_layout

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VideoAdapterMixin:
    """Shared by the video adapters: images or videos per call (`VisualInputs.modality`), one-frame inputs."""

    @staticmethod
    def _take_videos(kwargs: dict[str, Any]) -> tuple[Tensor | None, Tensor | None]:
        images = kwargs.pop("pixel_values", None)
        legacy = kwargs.pop("pixel_values_images", None)
        images = images if images is not None else legacy
        videos = kwargs.pop("pixel_values_videos", None)
        if images is not None and videos is not None:
            raise InputError(
                "a call with a plan attached carries images or videos, not both; run them as separate calls"
            )
        return images, videos

    def placeholder_ids(self, vis: VisualInputs) -> Tensor:
        cfg = self.model.config
        return torch.tensor([cfg.video_token_id if vis.modality == "video" else cfg.image_token_id])

    def pack(self, vis: VisualInputs, features: list[Tensor]) -> dict[str, Any]:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if vis.modality == "video":
            out = BaseModelOutputWithPooling(pooler_output=torch.cat(features)[None])
            return {"mm_encoder_outputs": {"video": out}}
        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=tuple(features))}}

    def frame_inputs(self, tokenizer, pixels: Tensor, prompts: list[str]) -> dict[str, Any]:
        """One-frame videos: the question `prompts[i]` (plain text) about frame `pixels[i]` (3, S, S)."""
        spec = self.video_spec()
        texts = [self.chat(p, "video").replace(spec.token, spec.token * spec.tokens(1)) for p in prompts]
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        dev = pixels.device
        return {"input_ids": enc["input_ids"].to(dev), "attention_mask": enc["attention_mask"].to(dev),
                "pixel_values_videos": pixels[:, None]}

    @staticmethod
    def _frames(videos: Tensor) -> Tensor:
        if videos.dim() != 5:
            raise InputError(f"pixel_values_videos must be (batch, frames, 3, H, W), got {tuple(videos.shape)}")
        return videos.flatten(0, 1)


@register_adapter("VideoLlavaForConditionalGeneration")
class VideoLlavaAdapter(VideoAdapterMixin, LlavaAdapter):
    """Video-LLaVA: image tower for images, video tower (CLS kept per frame) for videos."""

    visual_keys = ("pixel_values", "pixel_values_images", "pixel_values_videos")

    def visual_inputs(self, kwargs: dict[str, Any]) -> VisualInputs | None:
        images, videos = self._take_videos(kwargs)
        layer = {"feature_layer": feature_options(self.model, kwargs)}
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        if videos is not None:
            b, t = videos.shape[:2]
            return VisualInputs(self._frames(videos), [frame_layout(t, (side, side), cls=True) for _ in range(b)],
                                modality="video", options=layer)
        if images is None:
            return None
        return VisualInputs(images, [ImageLayout.single((side, side)) for _ in range(images.shape[0])], options=layer)

    def tower(self, vis: VisualInputs | None = None) -> VisionTower:
        m = self.model.model
        tower = m.video_tower if vis is not None and vis.modality == "video" else m.image_tower
        return hf_vision_tower(tower, self.feature_layer(vis))

    def finish_tokens(self, vis: VisualInputs, run: TowerRun, batch: list[VisualTokens]) -> list[VisualTokens]:
        out = super().finish_tokens(vis, run, batch)
        if vis.modality == "video":  # every frame's CLS, projected, feeds its extra token
            cls = self.project(run.prefix[:, 0])
            per = [lay.extra_slots.numel() for lay in vis.layouts]
            for lay, f in zip(vis.layouts, cls.split(per)):
                lay.extra_features = f
        return out

    def video_spec(self) -> VideoSpec:
        vc = self.model.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2 + 1
        return VideoSpec(size=vc.image_size, mean=CLIP_MEAN, std=CLIP_STD, tokens=lambda t: t * n)
