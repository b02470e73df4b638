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
import torch.nn.functional as F
from torch import Tensor

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
        (G, hh, ww) fp32 similarities in [-1, 1].
    """
    g, h, w, d = x.shape
    hh, ww, k = h // window, w // window, window
    win = x[:, : hh * k, : ww * k].float().reshape(g, hh, k, ww, k, d).permute(0, 1, 3, 2, 4, 5)
    win = F.normalize(win.reshape(g, hh, ww, k * k, d), dim=-1)
    total = win.sum(-2).pow(2).sum(-1)  # |sum of unit vectors|^2 = sum over all ordered pairs incl. self
    n = k * k
    return (total - n) / (n * (n - 1))


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
        """Merge every window of every item whose similarity reaches the threshold."""
        n = len(tokens)
        assign = torch.arange(n, device=tokens.features.device)
        k = self.window
        for i, (h, w) in enumerate(tokens.grids):
            idx = torch.nonzero(tokens.item == i).flatten()
            if idx.numel() != h * w:
                raise PlanError(
                    f"{self.name}: item {i} is no longer a full {h}x{w} grid at vision layer {self.layer}; "
                    "put mustdrop-vision before other reducers that act in the vision tower"
                )
            idx = idx[torch.argsort(tokens.row[idx] * w + tokens.col[idx])]  # raster order
            sim = window_similarity(tokens.features[idx].reshape(1, h, w, -1), k)[0]  # (hh, ww)
            hh, ww = sim.shape
            cells = idx.reshape(h, w)[: hh * k, : ww * k].reshape(hh, k, ww, k).permute(0, 2, 1, 3).reshape(hh, ww, -1)
            valid = (tokens.position[cells] >= 0).all(-1)
            merge = (sim >= float(self.threshold)) & valid  # (hh, ww)
            members = cells[merge]  # (m, k*k)
            assign[members.flatten()] = members[:, :1].expand_as(members).flatten()
        # group ids: each merged window is one group, every other token its own
        _, groups = torch.unique(assign, return_inverse=True)
        return tokens.group(groups, int(groups.max()) + 1, weighted=True)

    def mark_keys(self, tokens: VisualTokens) -> VisualTokens:
        """scores["key"] = 1 for the top key_ratio of each item's (valid) tokens by CLS attention."""
        attn = tokens.scores[self._key_probe].masked_fill(tokens.position < 0, -1.0)
        key = torch.zeros(len(tokens), device=attn.device)
        for i in range(tokens.num_items):
            idx = torch.nonzero((tokens.item == i) & (tokens.position >= 0)).flatten()
            top = math.ceil(float(self.key_ratio) * idx.numel())
            key[idx[torch.argsort(attn[idx], descending=True, stable=True)[:top]]] = 1.0
        return tokens.with_scores(key=key)
