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
    """Bookkeeping shared by the video adapters: which modality the current call carries."""

    _modality = "image"

    def _take_videos(self, kwargs: dict[str, Any]) -> tuple[Tensor | None, Tensor | None]:
        images = kwargs.pop("pixel_values", None)
        legacy = kwargs.pop("pixel_values_images", None)
        images = images if images is not None else legacy
        videos = kwargs.pop("pixel_values_videos", None)
        if images is not None and videos is not None:
            raise InputError(
                "a call with a plan attached carries images or videos, not both; run them as separate calls"
            )
        self._modality = "video" if videos is not None else "image"
        return images, videos

    def placeholder_ids(self) -> Tensor:
        cfg = self.model.config
        return torch.tensor([cfg.video_token_id if self._modality == "video" else cfg.image_token_id])

    def pack(self, features: list[Tensor]) -> dict[str, Any]:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if self._modality == "video":
            return {"video": BaseModelOutputWithPooling(pooler_output=torch.cat(features)[None])}
        return {"image": BaseModelOutputWithPooling(pooler_output=tuple(features))}

    def frame_inputs(self, tokenizer, pixels: Tensor, prompts: list[str]) -> dict[str, Any]:
        """One-frame videos: `prompts[i]` (with one "<video>") about frame `pixels[i]` (3, S, S)."""
        spec = self.video_spec()
        texts = []
        for p in prompts:
            if p.count(spec.token) != 1:
                raise InputError(f"a frame prompt must contain {spec.token!r} exactly once: {p!r}")
            texts.append(p.replace(spec.token, spec.token * spec.tokens(1)))
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

    def visual_inputs(self, kwargs: dict[str, Any]) -> VisualInputs | None:
        images, videos = self._take_videos(kwargs)
        self._feature_layer = feature_options(self.model, kwargs)
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        if videos is not None:
            b, t = videos.shape[:2]
            return VisualInputs(self._frames(videos), [frame_layout(t, (side, side), cls=True) for _ in range(b)])
        if images is None:
            return None
        return VisualInputs(images, [ImageLayout.single((side, side)) for _ in range(images.shape[0])])

    def tower(self) -> VisionTower:
        m = self.model.model
        tower = m.video_tower if self._modality == "video" else m.image_tower
        layer = getattr(self, "_feature_layer", None)
        return hf_vision_tower(tower, self.model.config.vision_feature_layer if layer is None else layer)

    def finish_tokens(self, vis: VisualInputs, run: TowerRun, batch: list[VisualTokens]) -> list[VisualTokens]:
        out = super().finish_tokens(vis, run, batch)
        if self._modality == "video":  # every frame's CLS, projected, feeds its extra token
            cls = self.project(run.prefix[:, 0])
            per = [lay.extra_slots.numel() for lay in vis.layouts]
            for lay, f in zip(vis.layouts, cls.split(per)):
                lay.extra_features = f
        return out

    def video_spec(self) -> VideoSpec:
        vc = self.model.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2 + 1
        return VideoSpec(size=vc.image_size, mean=CLIP_MEAN, std=CLIP_STD, tokens=lambda t: t * n)
