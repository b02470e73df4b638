"""Adapters for Qwen2-VL and Qwen2.5-VL: `Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`.

An image (or a video) of grid (t, h, w) patches is t items of (h/2) x (w/2) LLM tokens: the vision tower's
merger joins every 2x2 block of patches into one token (a video item is one temporal patch of two frames).
The tower itself runs on the patches, packed into one sequence per call with `cu_seqlens` segments (one per
item; Qwen2.5-VL adds windows of 8x8 patches in most layers) and 2-D rotary positions; here each layer gets
exactly the packed sequence the stock tower would build from the surviving patches, so keep-all plans are
bit-identical. Reducers see every item's patch grid inside the tower and the merged grid at the VISUAL stage.

Positions: the LLM uses 3-D (temporal, height, width) M-RoPE ids. Kept tokens keep the ids the stock model
gives them (selected from the full prompt's, never recomputed), and the text after them keeps its stock ids,
so decoding continues as in the stock model (as vLLM's EVS does). `mm_token_type_ids` shortens with input_ids.

Limits, by design: the tower has no CLS token (reducers that score by it are refused); reducers inside the
tower may not change its tokens (the merger needs every 2x2 block), so reduce at the VISUAL stage or later;
one modality (images or videos) per call.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tokenreduce.adapter import Adapter, ImageLayout, VisualInputs
from tokenreduce.encoder import TowerRun, TowerState, VisionTower
from tokenreduce.errors import InputError
from tokenreduce.flops import TransformerDims
from tokenreduce.registry import register_adapter
from tokenreduce.tokens import ItemInfo, VisualTokens

from ..llava.llava15 import config_dims

IMAGE, VIDEO = "image", "video"


@register_adapter("Qwen2VLForConditionalGeneration")
class Qwen2VLAdapter(Adapter):
    """Qwen2-VL (see module doc). Qwen2.5-VL differs only in its windowed vision layers and time spacing."""

    per_token_inputs = ("mm_token_type_ids",)
    windowed = False

    def visual_inputs(self, kwargs: dict[str, Any]) -> VisualInputs | None:
        images, videos = kwargs.pop("pixel_values", None), kwargs.pop("pixel_values_videos", None)
        grids = {IMAGE: kwargs.pop("image_grid_thw", None), VIDEO: kwargs.pop("video_grid_thw", None)}
        seconds = kwargs.pop("second_per_grid_ts", None)
        if images is not None and videos is not None:
            raise InputError("a call with a plan attached carries images or videos, not both; run them separately")
        if images is None and videos is None:
            return None
        modality, pixels = (IMAGE, images) if images is not None else (VIDEO, videos)
        grid = grids[modality]
        if grid is None:
            raise InputError(f"Qwen2-VL {modality}s need {modality}_grid_thw (the processor returns it)")
        m = self.model.config.vision_config.spatial_merge_size
        thw = [tuple(int(x) for x in g) for g in grid.tolist()]
        if pixels.shape[0] != sum(t * h * w for t, h, w in thw):
            raise InputError(f"{modality} pixel rows {pixels.shape[0]} do not match {modality}_grid_thw {thw}")
        layouts, item_pixels, start = [], [], 0
        for t, h, w in thw:
            if h % m or w % m:
                raise InputError(f"{modality}_grid_thw {(t, h, w)}: height and width must be multiples of {m}")
            n = (h // m) * (w // m)
            kind = "frame" if modality == VIDEO else "image"
            items = [ItemInfo(kind=kind, index=k if modality == VIDEO else -1) for k in range(t)]
            layouts.append(ImageLayout(items=items, grids=[(h // m, w // m)] * t, slots=torch.arange(t * n),
                                       length=t * n, info={"thw": (t, h, w)}))
            rows = pixels[start:start + t * h * w]
            item_pixels.append(rows.reshape(t, h // m, w // m, m * m, -1))
            start += t * h * w
        return VisualInputs(pixel_values=pixels, layouts=layouts, modality=modality, item_pixels=item_pixels,
                            options={"grid": grid, "seconds": seconds, "order": self._stock_order(thw)})

    def _stock_order(self, thw: list[tuple[int, int, int]]) -> dict[str, Tensor]:
        """Where the stock tower puts each patch in its packed sequence.

        Returns: "item" (P,) the item of each packed position, "raster" (P,) the patch's raster index in its
        item's (h, w) grid, "block" (P,) its index in block order (the processor's order, which the rotary
        table follows), "window" (P,) its attention window (Qwen2.5-VL; the item otherwise), "unit_back"
        (U,) the permutation that puts the merged tokens back in raster order of the merged grid, "widths"
        (G,) each item's patch-grid width and "index" (G, L) the packed position of each item's raster patch.
        """
        from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

        vc = self.model.config.vision_config
        m = vc.spatial_merge_size
        grid = torch.tensor(thw, dtype=torch.long)
        pos = get_vision_position_ids(grid, m)  # (P, 2) patch (row, col), block order
        widths = torch.cat([torch.full((t * h * w,), w) for t, h, w in thw])
        sizes = [h * w for t, h, w in thw for _ in range(t)]
        items = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        raster = pos[:, 0] * widths + pos[:, 1]
        n = raster.numel()
        if self.windowed:
            win_index, cu = get_vision_window_index(grid, m, vc.window_size, vc.patch_size)
            perm = (win_index[:, None] * m * m + torch.arange(m * m)).flatten()
            window = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long())
            unit_back = torch.argsort(win_index)
        else:
            perm, window, unit_back = torch.arange(n), items, torch.arange(n // (m * m))
        items, raster = items[perm], raster[perm]
        widths_g = [w for t, h, w in thw for _ in range(t)]
        index = torch.full((len(widths_g), int(torch.bincount(items).max())), -1, dtype=torch.long)
        index[items, raster] = torch.arange(n)
        return {"item": items, "raster": raster, "block": perm, "window": window, "unit_back": unit_back,
                "widths": torch.tensor(widths_g), "index": index}

    def tower(self, vis: VisualInputs | None = None) -> VisionTower:
        visual = self.model.model.visual
        full = set(getattr(visual, "fullatt_block_indexes", None) or range(len(visual.blocks)))
        order = None if vis is None else vis.options["order"]
        table: dict[str, Tensor] = {}

        def embed(pixels: Tensor) -> Tensor:
            from transformers.vision_utils import get_vision_position_ids

            x = visual.patch_embed(pixels)  # (P, D), block order
            grid = torch.tensor([lay.info["thw"] for lay in vis.layouts], device=x.device)
            cos, sin = visual.rotary_pos_emb(x, get_vision_position_ids(grid, visual.spatial_merge_size))
            table.update({k: v.to(x.device) for k, v in order.items()})
            block = table["block"]
            table.update(cos=cos[block], sin=sin[block])
            x = x[block]  # the stock packed order (Qwen2.5-VL: window order)
            return x[table["index"].clamp(min=0)]  # (G, L, D): every item's patches in raster order

        def run_layer(i: int, hidden: Tensor, state: TowerState) -> Tensor:
            key = (id(self), state.version)
            if key not in state.scratch:
                state.scratch[key] = _pack_plan(table, state, hidden.shape[1])
            flat_idx, packed_pos, cu_item, cu_window = state.scratch[key]
            cu = cu_item if i in full else cu_window
            flat = hidden.reshape(-1, hidden.shape[-1])
            x = visual.blocks[i](flat[flat_idx], cu_seqlens=cu[0], max_seqlen=cu[1],
                                 position_embeddings=(table["cos"][packed_pos], table["sin"][packed_pos]))
            out = flat.clone()
            out[flat_idx] = x
            return out.view_as(hidden)

        valid = None if order is None or bool((order["index"] >= 0).all()) else order["index"] >= 0
        return VisionTower(embed=embed, layers=visual.blocks, attention=lambda block: block.attn, prefix=0,
                           feature_layers=[len(visual.blocks)], run_layer=run_layer, valid=valid)

    def tower_tokens(self, vis: VisualInputs, batch: list[VisualTokens]) -> list[VisualTokens]:
        m = self.model.config.vision_config.spatial_merge_size
        return [VisualTokens.from_items([torch.zeros(h * w * m * m, 0) for h, w in v.grids],
                                        [(h * m, w * m) for h, w in v.grids], torch.zeros(len(v) * m * m),
                                        list(v.items)) for v in batch]

    def finish_tokens(self, vis: VisualInputs, run: TowerRun, batch: list[VisualTokens]) -> list[VisualTokens]:
        for v in run.batch:
            if len(v) != v.num_original or bool((v.source != torch.arange(len(v), device=v.source.device)).any()):
                raise InputError(
                    f"{type(self.model).__name__} merges every 2x2 block of patches after its vision tower, so "
                    "reducers inside the tower cannot change its tokens; reduce at the VISUAL stage instead"
                )
        order = vis.options["order"]
        feats = torch.cat([v.features for v in run.batch])  # raster within each item, items in order
        offsets = torch.tensor([0] + [h * w for v in run.batch for h, w in v.grids]).cumsum(0)[:-1]
        stock = feats[(offsets[order["item"]] + order["raster"]).to(feats.device)]  # the stock packed order
        merged = self.model.model.visual.merger(stock)[order["unit_back"].to(feats.device)]
        return [v.with_features(f) for v, f in zip(batch, merged.split([len(v) for v in batch]))]

    def project(self, features: Tensor) -> Tensor:
        raise NotImplementedError("Qwen2-VL projects with its merger over 2x2 patch blocks (see finish_tokens)")

    def placeholder_ids(self, vis: VisualInputs) -> Tensor:
        cfg = self.model.config
        return torch.tensor([cfg.video_token_id if vis.modality == VIDEO else cfg.image_token_id])

    def position_ids(self, vis: VisualInputs, inputs: dict[str, Any], kept: Tensor) -> Tensor:
        """The stock 3-D M-RoPE ids of the full prompt (3, B, L), at the kept slots (3, B, L'); padding 0."""
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        types = inputs.get("mm_token_type_ids")
        if types is None:
            cfg = self.model.config
            types = (ids == cfg.image_token_id).long() + 2 * (ids == cfg.video_token_id).long()
        kw = {"image_grid_thw" if vis.modality == IMAGE else "video_grid_thw": vis.options["grid"]}
        if self.windowed and vis.options.get("seconds") is not None:
            kw["second_per_grid_ts"] = vis.options["seconds"]
        full, _ = self.model.model.get_rope_index(ids, mm_token_type_ids=types, attention_mask=mask, **kw)
        index = kept.clamp(min=0)[None].expand(3, -1, -1)
        return torch.where(kept[None] >= 0, full.gather(2, index.to(full.device)), 0)

    def llm_dims(self) -> TransformerDims:
        tc = self.model.config.text_config
        return config_dims(tc, vocab=tc.vocab_size)

    def vision_dims(self) -> TransformerDims:
        vc = self.model.config.vision_config
        return TransformerDims(hidden=vc.embed_dim, intermediate=int(vc.embed_dim * vc.mlp_ratio), layers=vc.depth,
                               heads=vc.num_heads, kv_heads=vc.num_heads, gated=False)

    def chat(self, text: str, media: str | None = None) -> str:
        pad = {IMAGE: "<|image_pad|>", VIDEO: "<|video_pad|>"}.get(media)
        vision = f"<|vision_start|>{pad}<|vision_end|>" if pad else ""
        return f"<|im_start|>user\n{vision}{text}<|im_end|>\n<|im_start|>assistant\n"

    def frame_inputs(self, tokenizer: Any, pixels: Tensor, prompts: list[str]) -> dict[str, Any]:
        """One-item videos: `prompts[i]` about item `pixels[i]` ((h/2, w/2, 4, C) patch rows, see `Context.pixels`)."""
        n, hh, ww, mm, c = pixels.shape
        m = int(round(mm ** 0.5))
        texts = [self.chat(p, VIDEO).replace("<|video_pad|>", "<|video_pad|>" * (hh * ww)) for p in prompts]
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        ids = enc["input_ids"].to(pixels.device)
        return {"input_ids": ids, "attention_mask": enc["attention_mask"].to(pixels.device),
                "mm_token_type_ids": 2 * (ids == self.model.config.video_token_id).long(),
                "pixel_values_videos": pixels.reshape(-1, c),
                "video_grid_thw": torch.tensor([[1, hh * m, ww * m]] * n, device=pixels.device)}


@register_adapter("Qwen2_5_VLForConditionalGeneration")
class Qwen25VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: Qwen2-VL's contract with windowed vision layers (full attention in `fullatt_block_indexes`),
    a gated vision MLP, and video time spacing from `second_per_grid_ts`."""

    windowed = True

    def vision_dims(self) -> TransformerDims:
        vc = self.model.config.vision_config
        return TransformerDims(hidden=vc.hidden_size, intermediate=vc.intermediate_size, layers=vc.depth,
                               heads=vc.num_heads, kv_heads=vc.num_heads, gated=True)


def _pack_plan(table: dict[str, Tensor], state: TowerState, width: int):
    """For the current tokens: their flat (G*L) indices in stock packed order, their packed positions, and the
    (cu_seqlens, max_seqlen) of the item segments and of the attention windows."""
    valid = state.rows >= 0
    raster = state.rows * table["widths"][:, None] + state.cols  # each token's cell in its item's patch grid
    pos = torch.where(valid, table["index"].gather(1, raster.clamp(min=0)), -1)
    flat = torch.nonzero(valid.flatten()).flatten()
    packed = pos.flatten()[flat]
    order = torch.argsort(packed)
    flat, packed = flat[order], packed[order]
    return flat, packed, _segments(table["item"][packed]), _segments(table["window"][packed])


def _segments(ids: Tensor) -> tuple[Tensor, int]:
    """(cu_seqlens int32, max length) of the runs of equal consecutive `ids`."""
    _, counts = torch.unique_consecutive(ids, return_counts=True)
    cu = torch.nn.functional.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))
    return cu, int(counts.max())
