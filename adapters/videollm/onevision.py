"""Adapter for LLaVA-OneVision and LLaVA-Video checkpoints: `LlavaOnevisionForConditionalGeneration`, videos.

Every frame goes through SigLIP (27x27 = 729 tokens at 384 px, no CLS), the projector, then a 2x2
bilinear pooling to 14x14 = 196 tokens; one newline token follows the last frame. Reducers see the
pooled 14x14 grid of every frame (that is what the LLM sees); reducers inside the tower cannot change
a frame's tokens, since the model pools the full grid. Images (anyres_max) are not served yet.
"""

from __future__ import annotations

import math
from typing import Any

from tokenreduce.adapter import VisualInputs
from tokenreduce.encoder import TowerRun
from tokenreduce.errors import UnsupportedModelError
from tokenreduce.registry import register_adapter
from tokenreduce.tokens import VisualTokens

from ..llava.llava15 import LlavaAdapter, feature_options
from .common import VideoSpec, frame_layout, full_grid_features, tower_grid_tokens
from .video_llava import VideoAdapterMixin


@register_adapter("LlavaOnevisionForConditionalGeneration")
class LlavaOnevisionAdapter(VideoAdapterMixin, LlavaAdapter):
    """LLaVA-OneVision / LLaVA-Video: pooled 14x14 frames and a trailing newline (see module doc)."""

    def _sides(self) -> tuple[int, int]:
        vc = self.model.config.vision_config
        s = vc.image_size // vc.patch_size
        return s, math.ceil(s / 2)

    def visual_inputs(self, kwargs: dict[str, Any]) -> VisualInputs | None:
        images, videos = self._take_videos(kwargs)
        kwargs.pop("image_sizes", None)
        kwargs.pop("image_sizes_videos", None)
        self._feature_layer = feature_options(self.model, kwargs, has_cls=self.has_cls())
        if images is not None:
            raise UnsupportedModelError(
                "LLaVA-OneVision images (anyres_max tiling) are not served yet; videos are"
            )
        if videos is None:
            return None
        b, t = videos.shape[:2]
        _, q = self._sides()
        newline = self.model.model.image_newline
        return VisualInputs(self._frames(videos), [frame_layout(t, (q, q), newline=newline) for _ in range(b)])

    def tower_tokens(self, vis: VisualInputs, batch: list[VisualTokens]) -> list[VisualTokens]:
        s, _ = self._sides()
        return tower_grid_tokens(batch, (s, s))

    def finish_tokens(self, vis: VisualInputs, run: TowerRun, batch: list[VisualTokens]) -> list[VisualTokens]:
        x = full_grid_features(run.batch, "LLaVA-OneVision")
        pooled = self.model.model.apply_pooling(self.project(x))  # (G, q*q, D)
        return [v.with_features(f.flatten(0, 1)) for v, f in zip(batch, pooled.split([v.num_items for v in batch]))]

    def video_spec(self) -> VideoSpec:
        vc = self.model.config.vision_config
        _, q = self._sides()
        return VideoSpec(size=vc.image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), tokens=lambda t: t * q * q + 1)
