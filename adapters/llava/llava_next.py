"""Adapter for LLaVA-NeXT (LLaVA-1.6): transformers' `LlavaNextForConditionalGeneration`, anyres images.

Each image becomes an overview (the whole image resized to one tower input) plus gh x gw crops of a
high-resolution canvas. The stock model lays the crops out as one mosaic, cuts away the rows or columns
that are only padding ("unpadding"), and ends every mosaic row with a learned newline token. Here:

- every tower input is an item (`ItemInfo` kind "overview" or "crop", with its region of the image), so
  reducers can allocate budgets across the crops of an image (HiRED) and keep every token's origin;
- crop tokens that fall in the padding have no placeholder: they are dropped before the VISUAL stage,
  so budgets count only tokens the LLM would really see;
- newline tokens are extra tokens: a mosaic row's newline enters the LLM iff a token of that row
  survives (so reduced sequences keep the row structure the model was trained with), and they are not
  counted in budgets (the report lists them as ``extra_tokens``).

A plan that keeps everything gives the stock sequence, bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tokenreduce.adapter import ImageLayout, VisualInputs
from tokenreduce.errors import InputError
from tokenreduce.registry import register_adapter
from tokenreduce.tokens import ItemInfo

from .llava15 import LlavaAdapter, feature_options


def unpadded_window(orig_hw: tuple[int, int], grid_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the mosaic rows/columns that show the image, as transformers unpads.

    Args:
        orig_hw: the image's original (height, width) in pixels.
        grid_hw: the mosaic's (rows, columns) of tokens.
    """
    oh, ow = orig_hw
    h, w = grid_hw
    if ow / oh > w / h:
        new_h = int(round(oh * (w / ow), 7))
        pad = (h - new_h) // 2
        return pad, h - pad, 0, w
    new_w = int(round(ow * (h / oh), 7))
    pad = (w - new_w) // 2
    return 0, h, pad, w - pad


def anyres_layout(orig_hw: tuple[int, int], crops_hw: tuple[int, int], side: int,
                  newline: Tensor | None) -> ImageLayout:
    """The `ImageLayout` of one anyres image: overview, then crops row by row.

    Args:
        orig_hw: original image (height, width) in pixels.
        crops_hw: (gh, gw) crops of the high-resolution canvas.
        side: tokens per side of one tower input (24 for CLIP-L/14-336).
        newline: (D,) the model's newline embedding, or None.
    """
    gh, gw = crops_hw
    n = side * side
    top, bottom, left, right = unpadded_window(orig_hw, (gh * side, gw * side))
    kept_w = right - left
    items = [ItemInfo(kind="overview")]
    slots = [torch.arange(n)]
    owner = [torch.full((n,), -1, dtype=torch.long)]
    li = torch.arange(side).repeat_interleave(side)
    lj = torch.arange(side).repeat(side)
    for r in range(gh):
        for c in range(gw):
            y, x = r * side + li, c * side + lj
            inside = (y >= top) & (y < bottom) & (x >= left) & (x < right)
            slots.append(torch.where(inside, n + (y - top) * (kept_w + 1) + (x - left), -1))
            owner.append(torch.where(inside, y - top, -1))
            # a very wide or tall image can leave no mosaic row (or column) after unpadding: its crops then
            # have no placeholder at all, as in the stock model; spans of at least 1 keep the regions finite
            span_h, span_w = max(bottom - top, 1), max(kept_w, 1)
            region = (
                max(0.0, (r * side - top) / span_h), max(0.0, (c * side - left) / span_w),
                min(1.0, ((r + 1) * side - top) / span_h), min(1.0, ((c + 1) * side - left) / span_w),
            )
            items.append(ItemInfo(kind="crop", region=region))
    rows = bottom - top
    extra_slots = n + torch.arange(rows) * (kept_w + 1) + kept_w
    extra = None if newline is None else newline[None].expand(rows, -1)
    if newline is None:
        extra_slots = torch.zeros(0, dtype=torch.long)
        owner = [torch.full_like(o, -1) for o in owner]
    return ImageLayout(
        items=items, grids=[(side, side)] * (1 + gh * gw), slots=torch.cat(slots),
        length=n + rows * (kept_w + (newline is not None)), extra_slots=extra_slots, extra_owner=torch.cat(owner),
        extra_features=extra,
    )


@register_adapter("LlavaNextForConditionalGeneration")
class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT anyres: overview + crops per image, unpadding and row newlines (see module doc)."""

    def visual_inputs(self, kwargs: dict[str, Any]) -> VisualInputs | None:
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            image_size_to_num_patches,
        )

        pixel_values = kwargs.pop("pixel_values", None)
        image_sizes = kwargs.pop("image_sizes", None)
        layer = feature_options(self.model, kwargs)
        if pixel_values is None:
            return None
        if image_sizes is None:
            raise InputError("LLaVA-NeXT needs image_sizes (the processor returns them with pixel_values)")
        cfg = self.model.config
        vsize = cfg.vision_config.image_size
        side = vsize // cfg.vision_config.patch_size
        sizes = [tuple(int(v) for v in s) for s in image_sizes.tolist()]
        counts = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, vsize) for s in sizes]
        if pixel_values.dim() == 5:
            if pixel_values.shape[0] != len(sizes):
                raise InputError(f"pixel_values has {pixel_values.shape[0]} images but image_sizes has {len(sizes)}")
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, counts)])
        elif pixel_values.dim() != 4 or pixel_values.shape[0] != sum(counts):
            raise InputError(
                f"pixel_values of shape {tuple(pixel_values.shape)} do not match image_sizes "
                f"({sum(counts)} tower inputs expected)"
            )
        newline = getattr(self.model.model, "image_newline", None)
        layouts = []
        for s, n in zip(sizes, counts):
            if n == 1:  # no crops: the overview and one newline after it
                lay = ImageLayout.single((side, side), ItemInfo(kind="overview"))
                if newline is not None:
                    lay.extra_slots = torch.tensor([side * side])
                    lay.extra_owner = torch.zeros(side * side, dtype=torch.long)
                    lay.extra_features = newline[None]
                    lay.length += 1
                layouts.append(lay)
                continue
            gh, gw = get_anyres_image_grid_shape(s, cfg.image_grid_pinpoints, vsize)
            if 1 + gh * gw != n:
                raise InputError(f"image of size {s}: {n} tower inputs for a {gh}x{gw} crop grid")
            layouts.append(anyres_layout(s, (gh, gw), side, newline))
        return VisualInputs(pixel_values=pixel_values, layouts=layouts, options={"feature_layer": layer})
