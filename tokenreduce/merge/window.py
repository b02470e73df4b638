"""MustDrop's vision stage: merge similar 3x3 windows early in the vision tower, mark the key set.

Liu et al., "Multi-Stage Vision Token Dropping" (arXiv:2411.10803). Spec:
shared/specs/image-reducers.md section 3.2. After vision layer `layer` (0), every item's grid is cut into
non-overlapping `window` x `window` windows; a window whose tokens' mean pairwise cosine similarity
(off-diagonal, on the hidden states) reaches `threshold` becomes one token (the size-weighted mean of
its members), and the remaining tower layers run on the shorter sequence. At vision layer `key_layer`
(the last), the top `key_ratio` of each item's tokens by CLS attention (summed over heads) form the key
set: ``scores["key"] = 1`` marks them, and MustDrop's later stages never drop them.

Differences from the released code, on purpose:
- every item merges its own windows (the release merges the batch minimum number in every image, so a
  batch gives different tokens than each image alone);
- merged tokens stay in spatial order (the release moves them to the front), so positions in the LLM
  keep their raster meaning;
- windows that reach into anyres padding are not merged (they would carry real patches into a token
  that unpadding later drops); partial windows at the grid's edge are left alone, as in the release.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import kernels
from ..encoder import EncoderReducer, VisionTower
from ..errors import PlanError
from ..plan import Context, Probe, param
from ..registry import register_reducer
from ..tokens import VisualTokens


@torch.no_grad()
def window_similarity(x: Tensor, window: int) -> Tensor:
    """Mean off-diagonal cosine similarity of every non-overlapping window of a token grid.

    Args:
        x: (G, h, w, D) token grids.
        window: window side k; only the hh = h // k by ww = w // k full windows are scored.

    Returns:
        (G, hh, ww) fp32 similarities in [-1, 1] (`tokenreduce.kernels.window_similarity` with stride k).
    """
    return kernels.window_similarity(x, window)


@register_reducer
@dataclass
class MustDropVision(EncoderReducer):
    """MustDrop stage 1: 3x3 window merging after an early vision layer, and the key set.

    Fields:
        layer: vision layer after which windows are merged (0).
        window: window side (3).
        threshold: mean pairwise cosine similarity a window needs to be merged (0.8).
        key_ratio: fraction of each item's tokens kept as the key set, by CLS attention (0.08).
        key_layer: vision layer whose CLS attention picks the key set (-1: the last layer).
    """

    name = "mustdrop-vision"
    summary = "MustDrop stage 1: merge similar 3x3 windows in the vision tower, mark the key set"

    layer: int = param(0, "vision layer after which similar windows are merged")
    window: int = param(3, "window side: non-overlapping window x window windows of each grid")
    threshold: float = param(0.8, "mean pairwise cosine similarity a window needs to be merged into one token")
    key_ratio: float = param(0.08, "share of each item's tokens kept as the never-dropped key set (by CLS attention)")
    key_layer: int = param(-1, "vision layer whose CLS attention picks the key set (-1: the last)")

    def validate(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 2:
            raise PlanError(f"{self.name}: window must be an integer >= 2, got {self.window!r}")
        if not isinstance(self.threshold, (int, float)) or not -1.0 <= float(self.threshold) <= 1.01:
            raise PlanError(f"{self.name}: threshold must be a cosine similarity in [-1, 1], got {self.threshold!r}")
        if not isinstance(self.key_ratio, (int, float)) or not 0.0 <= float(self.key_ratio) <= 1.0:
            raise PlanError(f"{self.name}: key_ratio must be in [0, 1], got {self.key_ratio!r}")
        for f in ("layer", "key_layer"):
            if isinstance(getattr(self, f), bool) or not isinstance(getattr(self, f), int):
                raise PlanError(f"{self.name}: {f} must be a vision layer index, got {getattr(self, f)!r}")

    @property
    def _key_probe(self) -> str:
        return f"cls@{self.key_layer}"

    def probes(self) -> list[Probe]:
        return [Probe(self._key_probe, self.key_layer)] if self.key_ratio > 0 else []

    def layers(self, tower: VisionTower) -> list[int]:
        merge_at, last = tower.resolve(self.layer), max(tower.feature_layers) - 1
        if merge_at > last:  # the features were taken before this layer: a merge there could not reach the LLM
            raise PlanError(
                f"{self.name}: layer={self.layer} is vision layer {merge_at}, after layer {last} whose output is "
                f"the visual features; merge at a layer in 0..{last}"
            )
        return [self.layer] + ([self.key_layer] if self.key_ratio > 0 else [])

    def reduce_layer(
        self, layer: int, tower: VisionTower, batch: list[VisualTokens], contexts: list[Context]
    ) -> list[VisualTokens]:
        if layer == tower.resolve(self.layer):
            batch = [self.merge(v) for v in batch]
        if layer == tower.resolve(self.key_layer) and self.key_ratio > 0:
            batch = [self.mark_keys(v) for v in batch]
        return batch

    def merge(self, tokens: VisualTokens) -> VisualTokens:
        """Merge every window of every item whose similarity reaches the threshold.

        Items with the same grid are scored and merged in one `kernels.window_merge` call.
        """
        dev = tokens.features.device
        raster = torch.argsort(tokens.item * (1 << 32) + tokens.row * (1 << 16) + tokens.col, stable=True)
        counts = tokens.item_counts().tolist()
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        by_grid: dict[tuple[int, int], list[int]] = {}
        for i, (h, w) in enumerate(tokens.grids):
            if self.window > min(h, w):
                raise PlanError(
                    f"{self.name}: window={self.window} does not fit the {h}x{w} token grid of image/frame {i}; "
                    f"use window <= {min(h, w)}"
                )
            if counts[i] != h * w:
                raise PlanError(
                    f"{self.name}: item {i} is no longer a full {h}x{w} grid at vision layer {self.layer}; "
                    "put mustdrop-vision before other reducers that act in the vision tower"
                )
            by_grid.setdefault((h, w), []).append(i)
        assign = torch.empty(len(tokens), dtype=torch.long, device=dev)
        feats, next_id = [], 0
        for (h, w), items in by_grid.items():
            idx = torch.stack([raster[starts[i]:starts[i + 1]] for i in items]).view(len(items), h, w)
            res = kernels.window_merge(tokens.features[idx], self.window, float(self.threshold),
                                       valid=tokens.position[idx] >= 0, size=tokens.size[idx])
            assign[idx.flatten()] = res.assign + next_id
            feats.append(res.features)
            next_id += res.features.shape[0]
        # merged windows are one token each (the size-weighted mean), every other token stays itself
        return tokens.group(assign, next_id, features=torch.cat(feats).to(tokens.features.dtype))

    def mark_keys(self, tokens: VisualTokens) -> VisualTokens:
        """scores["key"] = 1 for the top key_ratio of each item's (valid) tokens by CLS attention."""
        valid = tokens.position >= 0
        counts = torch.bincount(tokens.item[valid], minlength=tokens.num_items).tolist()
        top = torch.tensor([math.ceil(float(self.key_ratio) * c) for c in counts], dtype=torch.long,
                           device=tokens.item.device)
        keys = kernels.segment_topk(tokens.scores[self._key_probe], torch.where(valid, tokens.item, -1), top)
        return tokens.with_scores(key=keys.float())
