"""The adapter contract: a stateless description of one model family.

An adapter knows one model family and nothing of any reducer; `tokenreduce.pipeline` does the work of a
call. It says:

- which keyword arguments carry visual inputs, and how they expand into placeholder tokens
  (`visual_inputs` -> `VisualInputs`: one `ImageLayout` per image or video, in prompt order);
- the vision tower, described for the core's layer-by-layer runner (`tower` -> `encoder.VisionTower`),
  and how tower features become the LLM's tokens (`tower_tokens`, `finish_tokens`, `project`);
- how the reduced features go back into the model (`placeholder_ids`, `pack`), which per-token inputs
  shorten with `input_ids` (`per_token_inputs`), and, for models with their own position scheme, the
  position ids of the kept tokens (`position_ids`);
- the decoder stack for in-LLM reduction (`language_model`), widths for FLOPs (`llm_dims`, `vision_dims`),
  and the services reducers may ask for through their `Context` (`frame_inputs`, `chat`).

Per-call facts (modality, feature layer, grids) travel in the `VisualInputs` of the call, never on the
adapter: one adapter instance may serve any number of calls. A new model family is one adapter file.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .encoder import TowerRun, VisionTower
from .errors import UnsupportedModelError
from .flops import TransformerDims
from .plan import Plan, Stage
from .tokens import ItemInfo, VisualTokens


@dataclass
class ImageLayout:
    """How one image (or video) of a prompt expands into placeholder tokens, item by item.

    Attributes (T = grid tokens of all the image's items, raster order item after item):
        items: what each tower item of the image is (overview, crop, frame, ...).
        grids: (h, w) token grid of each item.
        slots: (T,) long, offset of each grid token inside the image's placeholder run; -1 for a token
            with no placeholder (anyres padding), which is dropped before the VISUAL stage.
        length: number of placeholders of the image.
        extra_slots: (E,) long, offsets of tokens that are not grid tokens (e.g. row newlines).
        extra_owner: (T,) long, the extra token each grid token keeps alive (-1: none). An extra token
            enters the LLM iff one of its grid tokens survives (one that no grid token owns always does,
            e.g. the newlines of a mosaic that unpadding left without columns); it is not counted in budgets.
        extra_features: (E, D) features of the extra tokens, or None.
        tower_items: tower inputs of the image when they are not the items (LLaVA-OneVision interpolates
            a large anyres mosaic into one grid); None = one tower input per item.
        info: adapter-private facts about this image (e.g. how to rebuild a resampled mosaic).
    """

    items: list[ItemInfo]
    grids: list[tuple[int, int]]
    slots: Tensor
    length: int
    extra_slots: Tensor | None = None
    extra_owner: Tensor | None = None
    extra_features: Tensor | None = None
    tower_items: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tower_items(self) -> int:
        """Vision-tower inputs of the image (differs from len(grids) when the model resamples the tiles)."""
        return len(self.grids) if self.tower_items is None else self.tower_items

    @classmethod
    def single(cls, grid: tuple[int, int], info: ItemInfo | None = None) -> ImageLayout:
        """One grid, one placeholder per token (LLaVA-1.5)."""
        n = grid[0] * grid[1]
        return cls(items=[info or ItemInfo()], grids=[grid], slots=torch.arange(n), length=n)


@dataclass
class VisualInputs:
    """The visual inputs of one call, popped from the caller's kwargs by the adapter.

    Attributes:
        pixel_values: the vision tower's input for every image of the call, in prompt order ((G, C, H, W),
            one row per tower item, for the LLaVA families).
        layouts: one per image (or video), in prompt order.
        modality: "image" or "video".
        options: per-call facts the adapter needs later in the call (feature layer, grids, ...).
        item_pixels: per layout, its items' pixels (n_items, ...) when `pixel_values` rows are not tower
            items (Qwen2-VL packs patches); None = rows of `pixel_values`.
        raw_grids: per sample, (n_items, h, w, D) projected features before the model pools them; set by
            `finish_tokens` of models that pool (for `Context.raw_grids`).
    """

    pixel_values: Tensor
    layouts: list[ImageLayout]
    modality: str = "image"
    options: dict[str, Any] = field(default_factory=dict)
    item_pixels: list[Tensor] | None = None
    raw_grids: list[Tensor] | None = None

    def pixels(self, start: int, stop: int) -> Tensor | None:
        """(n_items, ...) the tower inputs of layouts start..stop-1 (one sample's images), or None if ragged."""
        if self.item_pixels is not None:
            parts = self.item_pixels[start:stop]
            if len({tuple(p.shape[1:]) for p in parts}) > 1:
                return None
            return torch.cat(parts) if parts else None
        first = sum(lay.num_tower_items for lay in self.layouts[:start])
        n = sum(lay.num_tower_items for lay in self.layouts[start:stop])
        return self.pixel_values[first:first + n]


class Adapter(abc.ABC):
    """The contract between the core and one model family (see the module docstring)."""

    #: stages this adapter can run reducers at
    stages: frozenset[Stage] = frozenset({Stage.ENCODER, Stage.VISUAL, Stage.PREFILL, Stage.DECODE})
    #: keyword arguments that carry visual inputs: a call with any of them is reduced
    visual_keys: tuple[str, ...] = ("pixel_values", "pixel_values_videos")
    #: keyword arguments shaped like input_ids (B, L) that must shorten with it
    per_token_inputs: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model

    def check(self, plan: Plan) -> None:
        """Raise `UnsupportedModelError` for a reducer this adapter cannot serve."""
        for r in plan.reducers:
            if r.stage not in self.stages:
                raise UnsupportedModelError(
                    f"{r.name} runs at the {r.stage} stage, which the {type(self).__name__} for "
                    f"{type(self.model).__name__} does not support yet (supported: "
                    f"{', '.join(sorted(str(s) for s in self.stages))})"
                )
            if any(p.kind == "cls" for p in r.probes()) and not self.has_cls():
                raise UnsupportedModelError(
                    f"{r.name} scores tokens by the vision tower's CLS attention, and the vision tower of "
                    f"{type(self.model).__name__} has no CLS token"
                )

    # -- the description every family gives ----------------------------------------------------------------
    @abc.abstractmethod
    def visual_inputs(self, kwargs: dict[str, Any]) -> VisualInputs | None:
        """Pop the visual inputs (pixel values and their options) from `kwargs`; None if there are none."""

    @abc.abstractmethod
    def tower(self, vis: VisualInputs | None = None) -> VisionTower:
        """The vision tower for a call's inputs (None: the default tower), for the core's layer-by-layer runner."""

    @abc.abstractmethod
    def project(self, features: Tensor) -> Tensor:
        """Map vision features (..., Dv) into the LLM's embedding space (..., D)."""

    def has_cls(self) -> bool:
        return self.tower(None).prefix > 0

    def tower_tokens(self, vis: VisualInputs, batch: list[VisualTokens]) -> list[VisualTokens]:
        """The tokens as the vision tower produces them, per sample. Default: the same grids the LLM's
        placeholders hold. Adapters that pool after the tower (LLaVA-OneVision video) return the finer grid."""
        return batch

    def finish_tokens(self, vis: VisualInputs, run: TowerRun, batch: list[VisualTokens]) -> list[VisualTokens]:
        """Tower features -> LLM-space tokens matching the placeholders (`batch`: the LLM-level tokens).

        Default: project every surviving token. Adapters that pool or that feed tower-computed extra
        tokens (a frame's CLS) override this, and may set `extra_features` on `vis.layouts`.
        """
        flat = self.project(torch.cat([v.features for v in run.batch]))
        return [v.with_features(f) for v, f in zip(run.batch, flat.split([len(v) for v in run.batch]))]

    def placeholder_ids(self, vis: VisualInputs) -> Tensor:
        """(P,) long: the placeholder ids of the call's visual tokens."""
        return torch.tensor([self.model.config.image_token_id])

    def pack(self, vis: VisualInputs, features: list[Tensor]) -> dict[str, Any]:
        """Model kwargs carrying the final features of every sample, in prompt order (`mm_encoder_outputs`)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"mm_encoder_outputs": {vis.modality: BaseModelOutputWithPooling(pooler_output=tuple(features))}}

    def position_ids(self, vis: VisualInputs, inputs: dict[str, Any], kept: Tensor) -> Tensor | None:
        """Position ids of the reduced sequence for models with their own position scheme; None = 1-D ids.

        Args:
            vis: the call's visual inputs.
            inputs: the caller's inputs (input_ids, attention_mask and the rest, before reduction).
            kept: (B, L') long, the caller's slot of every position of the reduced sequence (-1: padding).
        """
        return None

    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def llm_dims(self) -> TransformerDims | None:
        return None

    def vision_dims(self) -> TransformerDims | None:
        """Widths of the vision tower, if known (its FLOPs then follow the tokens of every tower item)."""
        return None

    # -- services for reducers (through `Context`) ---------------------------------------------------------
    def chat(self, text: str, media: str | None = None) -> str:
        """`text` as one user turn of the model's chat format, after one image/video placeholder if `media`."""
        raise UnsupportedModelError(f"{type(self).__name__} does not describe its chat format")

    def frame_inputs(self, tokenizer: Any, pixels: Tensor, prompts: list[str]) -> dict[str, Any]:
        """Model inputs asking `prompts[i]` (plain text) about the single image/frame `pixels[i]`."""
        raise UnsupportedModelError(f"{type(self).__name__} cannot build single-frame inputs")
