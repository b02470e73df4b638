"""Adapter for LLaVA-NeXT-Video: `LlavaNextVideoForConditionalGeneration`.

Images are served as in LLaVA-NeXT (anyres). Every video frame goes through CLIP (CLS dropped), the
model's spatial pooler (stride 2: 24x24 -> 12x12 at 336 px) and the projector; frames follow each other
with no newline. Reducers see each frame's pooled grid.
"""

from __future__ import annotations

from typing import Any

from tokenreduce.adapter import VisualInputs
from tokenreduce.encoder import TowerRun
from tokenreduce.registry import register_adapter
from tokenreduce.tokens import VisualTokens

from ..llava.llava15 import feature_options
from ..llava.llava_next import LlavaNextAdapter
from .common import VideoSpec, frame_layout, full_grid_features, pooled_scores, tower_grid_tokens
from .video_llava import CLIP_MEAN, CLIP_STD, VideoAdapterMixin


@register_adapter("LlavaNextVideoForConditionalGeneration")
class LlavaNextVideoAdapter(VideoAdapterMixin, LlavaNextAdapter):
    """LLaVA-NeXT-Video: anyres images, pooled frames for videos (see module doc)."""

    def _sides(self) -> tuple[int, int]:
        cfg = self.model.config
        s = cfg.vision_config.image_size // cfg.vision_config.patch_size
        return s, s // cfg.spatial_pool_stride

    def visual_inputs(self, kwargs: dict[str, Any]) -> VisualInputs | None:
        videos = kwargs.get("pixel_values_videos")
        if videos is None:
            return super().visual_inputs(kwargs)
        self._take_videos(kwargs)
        layer = feature_options(self.model, kwargs)
        b, t = videos.shape[:2]
        _, q = self._sides()
        return VisualInputs(self._frames(videos), [frame_layout(t, (q, q)) for _ in range(b)], modality="video",
                            options={"feature_layer": layer})

    def tower_tokens(self, vis: VisualInputs, batch: list[VisualTokens]) -> list[VisualTokens]:
        if vis.modality != "video":
            return batch
        s, _ = self._sides()
        return tower_grid_tokens(batch, (s, s))

    def finish_tokens(self, vis: VisualInputs, run: TowerRun, batch: list[VisualTokens]) -> list[VisualTokens]:
        if vis.modality != "video":
            return super().finish_tokens(vis, run, batch)
        x = full_grid_features(run.batch, "LLaVA-NeXT-Video")
        pooled = self.project(self.model.model.vision_resampler(x))  # (G, q*q, D)
        out = [v.with_features(f.flatten(0, 1)) for v, f in zip(batch, pooled.split([v.num_items for v in batch]))]
        s, _ = self._sides()
        return pooled_scores(run.batch, out, (s, s), self.model.config.spatial_pool_stride)

    def video_spec(self) -> VideoSpec:
        vc = self.model.config.vision_config
        _, q = self._sides()
        return VideoSpec(size=vc.image_size, mean=CLIP_MEAN, std=CLIP_STD, tokens=lambda t: t * q * q)
