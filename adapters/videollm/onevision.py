"""Adapter for LLaVA-OneVision and LLaVA-Video checkpoints: `LlavaOnevisionForConditionalGeneration`.

Videos: every frame goes through SigLIP (27x27 = 729 tokens at 384 px, no CLS), the projector, then a 2x2
bilinear pooling to 14x14 = 196 tokens; one newline token follows the last frame. Reducers see the
pooled 14x14 grid of every frame (that is what the LLM sees); reducers inside the tower cannot change
a frame's tokens, since the model pools the full grid.

Images ("anyres_max_9"): as LLaVA-NeXT (overview + crops, unpadding, row newlines), except that a mosaic
larger than max x (27x27) tokens is bilinearly shrunk to that size: such an image's items are then the
overview and one interpolated mosaic grid (the tower still sees the overview and every crop). A sample
with several images gets one tile per image and a newline after each, as the model does.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from tokenreduce.adapter import ImageLayout, VisualInputs
from tokenreduce.encoder import TowerRun
from tokenreduce.errors import InputError
from tokenreduce.registry import register_adapter
from tokenreduce.tokens import ItemInfo, VisualTokens

from ..llava.llava15 import LlavaAdapter, feature_options
from ..llava.llava_next import anyres_layout, unpadded_window
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
        kwargs.pop("image_sizes_videos", None)
        layer = {"feature_layer": feature_options(self.model, kwargs, has_cls=self.has_cls())}
        if images is not None:
            vis = self._image_inputs(images, kwargs)
            vis.options.update(layer)
            return vis
        if videos is None:
            return None
        b, t = videos.shape[:2]
        _, q = self._sides()
        newline = self.model.model.image_newline
        return VisualInputs(self._frames(videos), [frame_layout(t, (q, q), newline=newline) for _ in range(b)],
                            modality="video", options=layer)

    def _image_inputs(self, images: Tensor, kwargs: dict[str, Any]) -> VisualInputs:
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            image_size_to_num_patches,
        )

        cfg = self.model.config
        sizes = kwargs.pop("image_sizes", None)
        per_sample = kwargs.pop("batch_num_images", None)
        ratio_name = kwargs.pop("vision_aspect_ratio", None) or cfg.vision_aspect_ratio
        if sizes is None:
            raise InputError("LLaVA-OneVision images need image_sizes (the processor returns them)")
        sizes = [tuple(int(v) for v in s) for s in sizes.tolist()]
        patch = [True] * len(sizes) if per_sample is None else [n == 1 for n in per_sample.tolist() for _ in range(n)]
        vsize = cfg.vision_config.image_size
        counts = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, vsize) if p else 1
                  for s, p in zip(sizes, patch)]
        if images.dim() == 5:
            images = torch.cat([pv[:n] for pv, n in zip(images, counts)])
        side, _ = self._sides()
        newline = self.model.model.image_newline
        max_tiles = int(ratio_name.removeprefix("anyres_max_"))
        layouts = []
        for s, n in zip(sizes, counts):
            if n == 1:
                lay = ImageLayout.single((side, side), ItemInfo(kind="overview"))
                lay.extra_slots, lay.extra_features = torch.tensor([side * side]), newline[None]
                lay.extra_owner = torch.zeros(side * side, dtype=torch.long)
                lay.length += 1
                layouts.append(lay)
                continue
            gh, gw = get_anyres_image_grid_shape(s, cfg.image_grid_pinpoints, vsize)
            top, bottom, left, right = unpadded_window(s, (gh * side, gw * side))
            ratio = math.sqrt((bottom - top) * (right - left) / (max_tiles * side * side))
            if ratio <= 1.1:
                layouts.append(anyres_layout(s, (gh, gw), side, newline))
                continue
            h2, w2 = int((bottom - top) // ratio), int((right - left) // ratio)
            layouts.append(_resampled_layout(side, (h2, w2), newline, tower_items=n, shrink=(gh, gw, s, ratio)))
        return VisualInputs(pixel_values=images, layouts=layouts)

    def image_inputs(self, tokenizer, texts: list[str], images: list) -> dict[str, Tensor]:
        """Model inputs for prompts with one "<image>" each and one PIL image per prompt, built like the
        model's processor does (its class needs torchvision here): anyres tiles, placeholders per image."""
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        cfg = self.model.config
        size = cfg.vision_config.image_size
        proc = LlavaOnevisionImageProcessorPil(size={"height": size, "width": size},
                                               image_grid_pinpoints=cfg.image_grid_pinpoints,
                                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
        enc = proc(images=images, return_tensors="pt")
        vis = self._image_inputs(enc["pixel_values"], {"image_sizes": enc["image_sizes"]})
        expanded = []
        for text, lay in zip(texts, vis.layouts):
            if text.count("<image>") != 1:
                raise InputError(f"each prompt needs exactly one <image>: {text!r}")
            expanded.append(text.replace("<image>", "<image>" * lay.length))
        out = dict(tokenizer(expanded, padding=True, return_tensors="pt"))
        out.update(pixel_values=enc["pixel_values"], image_sizes=enc["image_sizes"])
        return out

    def tower_tokens(self, vis: VisualInputs, batch: list[VisualTokens]) -> list[VisualTokens]:
        s, _ = self._sides()
        if vis.modality == "video":
            return tower_grid_tokens(batch, (s, s))
        if all(lay.tower_items is None for lay in vis.layouts):
            return batch
        counts, i = [], 0
        for v in batch:
            n_img = max(it.image for it in v.items) + 1
            counts.append(sum(lay.num_tower_items for lay in vis.layouts[i:i + n_img]))
            i += n_img
        return [VisualTokens.from_items([torch.zeros(s * s, 0)] * n, [(s, s)] * n, torch.zeros(n * s * s))
                for n in counts]

    def finish_tokens(self, vis: VisualInputs, run: TowerRun, batch: list[VisualTokens]) -> list[VisualTokens]:
        if vis.modality == "video":
            x = self.project(full_grid_features(run.batch, "LLaVA-OneVision"))  # (G, s*s, D)
            s, _ = self._sides()
            per = [v.num_items for v in batch]
            vis.raw_grids = [g.reshape(-1, s, s, g.shape[-1]) for g in x.split(per)]
            pooled = self.model.model.apply_pooling(x)  # (G, q*q, D)
            return [v.with_features(f.flatten(0, 1)) for v, f in zip(batch, pooled.split(per))]
        if all(lay.tower_items is None for lay in vis.layouts):
            return super().finish_tokens(vis, run, batch)
        x = self.project(full_grid_features(run.batch, "LLaVA-OneVision (large images)"))  # (G, s*s, D)
        tiles = iter(x.split([lay.num_tower_items for lay in vis.layouts]))
        feats = []
        for lay in vis.layouts:
            t = next(tiles)
            feats.append(t.flatten(0, 1) if lay.tower_items is None else _shrink_mosaic(t, lay.info["shrink"]))
        out, i = [], 0
        for v in batch:
            n_img = max(it.image for it in v.items) + 1
            out.append(v.with_features(torch.cat(feats[i:i + n_img])))
            i += n_img
        return out

    def video_spec(self) -> VideoSpec:
        vc = self.model.config.vision_config
        _, q = self._sides()
        return VideoSpec(size=vc.image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), tokens=lambda t: t * q * q + 1)


def _resampled_layout(side: int, grid: tuple[int, int], newline: Tensor, tower_items: int,
                      shrink: tuple[int, int, tuple[int, int], float]) -> ImageLayout:
    """Overview + one interpolated mosaic grid (h2, w2) with a newline after each of its rows.

    `shrink` = (gh, gw, original (height, width), ratio): how `_shrink_mosaic` rebuilds the grid's features.
    """
    h2, w2 = grid
    n = side * side
    r = torch.arange(h2).repeat_interleave(w2)
    slots = torch.cat([torch.arange(n), n + r * (w2 + 1) + torch.arange(w2).repeat(h2)])
    lay = ImageLayout(
        items=[ItemInfo(kind="overview"), ItemInfo(kind="crop")], grids=[(side, side), (h2, w2)], slots=slots,
        length=n + h2 * (w2 + 1), extra_slots=n + torch.arange(h2) * (w2 + 1) + w2,
        extra_owner=torch.cat([torch.full((n,), -1), r]), extra_features=newline[None].expand(h2, -1),
        tower_items=tower_items, info={"shrink": shrink},
    )
    return lay


def _shrink_mosaic(tiles: Tensor, shrink: tuple[int, int, tuple[int, int], float]) -> Tensor:
    """(1 + gh*gw, s*s, D) projected tiles -> (n, D): the overview, then the mosaic unpadded and bilinearly
    shrunk exactly as `LlavaOnevisionModel.pack_image_features` does, in raster order."""
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    gh, gw, size, ratio = shrink
    s = math.isqrt(tiles.shape[1])
    d = tiles.shape[-1]
    mosaic = tiles[1:].reshape(gh, gw, s, s, d).permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
    mosaic = unpad_image(mosaic, size)
    h, w = mosaic.shape[1:]
    mosaic = torch.nn.functional.interpolate(mosaic[None], [int(h // ratio), int(w // ratio)], mode="bilinear")[0]
    return torch.cat([tiles[0], mosaic.flatten(1, 2).transpose(0, 1)])
