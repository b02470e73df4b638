"""Baselines every paper compares against: seeded random dropping and uniform spatial pooling."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import BudgetError, PlanError
from ..plan import BudgetedReducer, Context, Stage, param
from ..registry import register_reducer
from ..tokens import VisualTokens


@register_reducer
@dataclass
class RandomDrop(BudgetedReducer):
    """Keep a uniformly random subset of each image's/frame's tokens (spatial order kept).

    Seeded per sample, so the kept set depends only on the sample and `seed`, never on its batch.
    """

    name = "random"
    stage = Stage.VISUAL
    summary = "baseline: keep a seeded random subset of tokens per image/frame"

    seed: int = param(0, "random seed; the kept set depends only on the sample and the seed")

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.seed, int):
            raise PlanError(f"random: seed= must be an integer, got {self.seed!r}")

    def reduce_sample(self, tokens: VisualTokens, ctx: Context) -> VisualTokens:
        gen = torch.Generator().manual_seed(self.seed)
        keep = []
        for i, k in enumerate(self.item_budgets(tokens)):
            idx = torch.nonzero(tokens.item == i).flatten()
            perm = torch.randperm(idx.numel(), generator=gen)[:k].to(idx.device)
            keep.append(idx[perm])
        index = torch.sort(torch.cat(keep)).values
        return tokens.select(index)


def pool_assignment(h: int, w: int, k: int, device=None) -> Tensor:
    """Assign each cell of an (h, w) grid to one of exactly `k` near-uniform rectangular bins.

    The grid is cut into `b` horizontal bands (b chosen so bins are about square); band j gets
    floor or ceil(k / b) bins of near-equal width. For k = h*w/4 on an even square grid this is
    exactly 2x2 pooling. Returns (h*w,) long bin ids in raster order of the bins.
    """
    if not 1 <= k <= h * w:
        raise BudgetError(f"pool: cannot make {k} bins out of a {h}x{w} grid")
    bands = max(1, min(h, k, round((k * h / w) ** 0.5)))
    per_band = torch.full((bands,), k // bands, dtype=torch.long)
    per_band[: k % bands] += 1
    # a band cannot have more bins than columns: move the excess to other bands
    while bool((per_band > w).any()):
        bands += 1
        per_band = torch.full((bands,), k // bands, dtype=torch.long)
        per_band[: k % bands] += 1
    rows = torch.arange(h)
    band_of_row = (rows * bands) // h  # (h,)
    start = torch.cat([torch.zeros(1, dtype=torch.long), per_band.cumsum(0)[:-1]])
    cols = torch.arange(w)
    nb = per_band[band_of_row]  # (h,) bins in the row's band
    col_bin = (cols[None, :] * nb[:, None]) // w  # (h, w)
    ids = start[band_of_row][:, None] + col_bin
    return ids.flatten().to(device)


@register_reducer
@dataclass
class Pool(BudgetedReducer):
    """Uniform spatial downsampling: average each image's/frame's token grid into exactly k bins.

    k = the item's share of the budget. Bins are near-square rectangles (2x2 average pooling when
    k = h*w/4), so every original token is in exactly one kept token.
    """

    name = "pool"
    stage = Stage.VISUAL
    summary = "baseline: average-pool each image/frame token grid to the budget"

    def reduce_sample(self, tokens: VisualTokens, ctx: Context) -> VisualTokens:
        assign = torch.full((len(tokens),), -1, dtype=torch.long, device=tokens.features.device)
        offset = 0
        for i, k in enumerate(self.item_budgets(tokens)):
            idx = torch.nonzero(tokens.item == i).flatten()
            if idx.numel() == 0:
                continue
            # the item's tokens must fill a rectangle of its grid: the whole grid, or what anyres
            # unpadding left of a crop
            r0, c0 = int(tokens.row[idx].min()), int(tokens.col[idx].min())
            h, w = int(tokens.row[idx].max()) - r0 + 1, int(tokens.col[idx].max()) - c0 + 1
            if idx.numel() != h * w:
                gh, gw = tokens.grids[i]
                raise BudgetError(
                    f"pool: item {i} has {idx.numel()} tokens, not a full rectangle of its {gh}x{gw} grid; "
                    "put pool before any other reducer of the same stage"
                )
            cell = (tokens.row[idx] - r0) * w + (tokens.col[idx] - c0)
            assign[idx] = pool_assignment(h, w, k, tokens.features.device)[cell] + offset
            offset += k
        return tokens.group(assign, offset, weighted=True)
