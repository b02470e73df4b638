"""Baselines every paper compares against: seeded random dropping and uniform spatial pooling."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import kernels
from ..errors import BudgetError, PlanError
from ..params import short
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
    item_budgeted = True
    summary = "baseline: keep a seeded random subset of tokens per image/frame"

    seed: int = param(0, "random seed; the kept set depends only on the sample and the seed")

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.seed < 2**64:  # what torch.Generator.manual_seed takes (the type is checked already)
            raise PlanError(f"random: seed= must be in [0, 2**64), got {short(self.seed)}")

    def reduce_sample(self, tokens: VisualTokens, ctx: Context) -> VisualTokens:
        gen = torch.Generator().manual_seed(self.seed)
        keep = []
        for i, k in enumerate(self.item_budgets(tokens)):
            idx = torch.nonzero(tokens.item == i).flatten()
            perm = torch.randperm(idx.numel(), generator=gen)[:k].to(idx.device)
            keep.append(idx[perm])
        index = torch.sort(torch.cat(keep)).values
        return tokens.select(index)


@functools.lru_cache(maxsize=256)
def _pool_table(h: int, w: int, k: int) -> Tensor:
    return pool_assignment(h, w, k)


def pool_assignment(h: int, w: int, k: int, device=None) -> Tensor:
    """Assign each cell of an (h, w) grid to one of exactly `k` near-uniform rectangular bins.

    The grid is cut into `b` horizontal bands (b chosen so bins are about square); band j gets
    floor or ceil(k / b) bins of near-equal width. For k = h*w/4 on an even square grid this is
    exactly 2x2 pooling. Returns (h*w,) long bin ids in raster order of the bins.
    """
    if not 1 <= k <= h * w:
        raise BudgetError(f"pool: cannot pool a {h}x{w} grid into {k} tokens (1 to {h * w})")
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
    k = h*w/4), so every original token is in exactly one kept token. Every image/frame keeps at least one
    token, so the budget must be at least their number (else `BudgetError`); a reducer that drives pool
    with its own per-frame budgets (QuoTA's resize="pool") may give a frame 0 tokens, which drops it.
    Shapes: all items in one pass (bins from a per-grid-shape table, the means from `kernels.scatter_mean`).
    """

    name = "pool"
    stage = Stage.VISUAL
    item_budgeted = True
    summary = "baseline: average-pool each image/frame token grid to the budget"

    def reduce_sample(self, tokens: VisualTokens, ctx: Context) -> VisualTokens:
        dev = tokens.features.device
        counts = tokens.item_counts().tolist()
        live = sum(c > 0 for c in counts)
        if getattr(self, "fixed_item_budgets", None) is None and self.budget(len(tokens)) < live:
            what = "frames" if any(i.kind == "frame" for i in tokens.items) else "images or crops"
            raise BudgetError(
                f"pool: a budget of {self.budget(len(tokens))} visual tokens is fewer than the {live} {what} of the "
                f"sample; pooling keeps at least one token of each: give tokens >= {live}"
            )
        ks = self.item_budgets(tokens)
        # each item's tokens must fill a rectangle of its grid: the whole grid, or what anyres unpadding left
        r0, c0, hs, ws = tokens.item_boxes()
        tables, table_of_item, offset = [], [], []
        shapes: dict[tuple[int, int, int], int] = {}
        total = 0
        for i, (c, k) in enumerate(zip(counts, ks)):
            offset.append(total)
            if c == 0 or k == 0:
                table_of_item.append(-1)
                continue
            h, w = hs[i], ws[i]
            if c != h * w:
                gh, gw = tokens.grids[i]
                raise BudgetError(
                    f"pool: item {i} has {c} tokens, not a full rectangle of its {gh}x{gw} grid; "
                    "put pool before any other reducer of the same stage"
                )
            key = (h, w, k)
            if key not in shapes:
                shapes[key] = len(tables)
                tables.append(_pool_table(h, w, k))
            table_of_item.append(shapes[key])
            total += k
        cells = max(t.numel() for t in tables) if tables else 1
        table = torch.full((len(tables) + 1, cells), -1, dtype=torch.long)
        for j, t in enumerate(tables):
            table[j, : t.numel()] = t
        table = table.to(dev)
        which = torch.tensor(table_of_item, dtype=torch.long, device=dev)[tokens.item]  # -1: the all -1 row
        cell = (tokens.row - r0[tokens.item]) * torch.tensor(ws, device=dev)[tokens.item] + (tokens.col
                                                                                             - c0[tokens.item])
        local = table[which, cell.clamp(0, cells - 1)]
        base = torch.tensor(offset, dtype=torch.long, device=dev)[tokens.item]
        assign = torch.where(local >= 0, local + base, -1)
        feats, _ = kernels.scatter_mean(tokens.features, assign, total, tokens.size, weighted=True, check=False)
        return tokens.group(assign, total, features=feats)
