"""`VisualTokens`: the visual tokens of one sample plus where every token came from.

Reducers take and return `VisualTokens`. They never lose the origin: every token knows which
image/frame it belongs to, its row and column in that item's original grid, the position its
placeholder had in the caller's sequence, and how many original tokens it stands for. The `source`
map says, for every *original* token, which current token now holds it (or -1 if it was dropped).
That is what lets later stages, the report, the demo's heat map and the tests see what survived.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class ItemInfo:
    """One image, crop or frame of a sample (an "item": one grid of tokens from one vision-tower input).

    Attributes:
        image: index of the image or video (within the sample) the item comes from.
        kind: "image" (the whole image, one grid), "overview" (the downscaled whole image of an anyres
            model), "crop" (a high-resolution tile), or "frame" (a video frame).
        region: (top, left, bottom, right) of the item in its image, as fractions of the image's height
            and width; (0, 0, 1, 1) for whole images and frames.
        index: frame index in the video (frames), or -1.
    """

    image: int = 0
    kind: str = "image"
    region: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    index: int = -1


@dataclass
class VisualTokens:
    """Visual tokens of one sample.

    Attributes (N = current tokens, N0 = original tokens, D = feature width):
        features: (N, D) token features.
        item: (N,) long, index of the image or frame (within the sample) of the token's representative.
        row, col: (N,) long, the representative's place in its item's original grid (-1 if none).
        position: (N,) long, the representative's placeholder position in the caller's sequence.
        size: (N,) float, how many original tokens this token stands for (1 until merged).
        source: (N0,) long, for every original token the index of the current token holding it, -1 if dropped.
        grids: (h, w) of the original token grid of every item.
        items: what every item is (`ItemInfo`: its image, its kind, its region of the image); adapters
            fill it, reducers that allocate budgets across crops or frames read it.
        scores: named per-token scores (N,) computed by earlier stages (e.g. ``"cls@22"``: CLS attention
            summed over heads at vision layer 22; ``"key"``: 1.0 for tokens a later stage must not drop), or
            per-token vectors (N, K) (``"keys@feature"``: the vision tower's keys of the visual features).
            Carried through `select` (indexed) and `group` (summed over members).
    """

    features: Tensor
    item: Tensor
    row: Tensor
    col: Tensor
    position: Tensor
    size: Tensor
    source: Tensor
    grids: tuple[tuple[int, int], ...]
    items: tuple[ItemInfo, ...] = ()
    scores: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.items:
            self.items = tuple(ItemInfo(image=i) for i in range(len(self.grids)))

    @classmethod
    def from_items(
        cls,
        features: list[Tensor],
        grids: list[tuple[int, int]],
        positions: Tensor,
        items: list[ItemInfo] | None = None,
    ) -> VisualTokens:
        """Build the original tokens of a sample from per-item features.

        Args:
            features: one (h*w, D) tensor per item, tokens in raster order.
            grids: (h, w) per item.
            positions: (sum h*w,) long, placeholder positions in the caller's sequence.
            items: what each item is (default: each item is its own whole image).
        """
        device = features[0].device
        item_ids, rows, cols = [], [], []
        for i, (f, (h, w)) in enumerate(zip(features, grids)):
            if f.shape[0] != h * w:
                raise ValueError(f"item {i}: {f.shape[0]} tokens do not fill its {h}x{w} grid")
            r = torch.arange(h, device=device).repeat_interleave(w)
            item_ids.append(torch.full((h * w,), i, dtype=torch.long, device=device))
            rows.append(r)
            cols.append(torch.arange(w, device=device).repeat(h))
        n = sum(f.shape[0] for f in features)
        return cls(
            features=torch.cat(features, 0),
            item=torch.cat(item_ids),
            row=torch.cat(rows),
            col=torch.cat(cols),
            position=positions.to(device=device, dtype=torch.long),
            size=torch.ones(n, device=device, dtype=torch.float32),
            source=torch.arange(n, device=device),
            grids=tuple(grids),
            items=tuple(items) if items else (),
        )

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def num_items(self) -> int:
        return len(self.grids)

    @property
    def num_original(self) -> int:
        return self.source.shape[0]

    def item_counts(self) -> Tensor:
        """(num_items,) long: current tokens per item."""
        return torch.bincount(self.item, minlength=self.num_items)

    def item_boxes(self) -> tuple[Tensor, Tensor, list[int], list[int]]:
        """Each item's bounding rectangle on its grid: first row (num_items,), first column (num_items,), and
        heights and widths as lists (an item without tokens gets a negative size)."""
        dev, n = self.item.device, self.num_items
        big = torch.iinfo(torch.long).max
        r0 = torch.full((n,), big, device=dev).scatter_reduce(0, self.item, self.row, "amin")
        c0 = torch.full((n,), big, device=dev).scatter_reduce(0, self.item, self.col, "amin")
        r1 = torch.full((n,), -1, device=dev).scatter_reduce(0, self.item, self.row, "amax")
        c1 = torch.full((n,), -1, device=dev).scatter_reduce(0, self.item, self.col, "amax")
        return r0, c0, (r1 - r0 + 1).tolist(), (c1 - c0 + 1).tolist()

    def select(self, index: Tensor) -> VisualTokens:
        """Keep the tokens at `index` (a 1-D long tensor), in the order given."""
        assign = torch.full((len(self),), -1, dtype=torch.long, device=self.features.device)
        assign[index] = torch.arange(index.numel(), device=assign.device)
        return self._reindex(
            assign, index, self.features[index], self.size[index], {k: v[index] for k, v in self.scores.items()}
        )

    def group(
        self,
        assign: Tensor,
        num_groups: int,
        weighted: bool = True,
        features: Tensor | None = None,
        rep: Tensor | None = None,
    ) -> VisualTokens:
        """Combine tokens into `num_groups` tokens; `assign[i]` is the group of token i (-1 drops it).

        A group's features are the (size-weighted, if `weighted`) mean of its members unless `features`
        (num_groups, D) are given; its size is the sum of the members' sizes; its scores are the sums of its
        members' scores (per row for vector-valued scores). Its origin is that of its first member, and
        groups keep the order of their first members, so spatial order is preserved; or, with `rep`
        (num_groups,) long, group g takes the origin of member ``rep[g]`` (the token the others were merged
        into) and groups keep the order of their ids.
        """
        n = len(self)
        kept = assign >= 0
        if rep is None:
            idx = torch.arange(n, device=assign.device)
            first = torch.full((num_groups,), n, dtype=torch.long, device=assign.device)
            first = first.scatter_reduce(0, assign[kept], idx[kept], reduce="amin")
            if bool((first == n).any()):
                raise ValueError("group(): every group id in [0, num_groups) needs at least one member")
        elif tuple(rep.shape) != (num_groups,):
            raise ValueError(f"group(): rep must have shape ({num_groups},), got {tuple(rep.shape)}")
        size = torch.zeros(num_groups, device=self.size.device, dtype=self.size.dtype)
        size = size.index_add(0, assign[kept], self.size[kept])
        if features is None:
            w = self.size[kept] if weighted else torch.ones_like(self.size[kept])
            denom = torch.zeros(num_groups, device=w.device, dtype=torch.float32).index_add(0, assign[kept], w)
            acc = torch.zeros(
                num_groups, self.features.shape[1], device=self.features.device, dtype=torch.float32
            )
            acc = acc.index_add(0, assign[kept], self.features[kept].float() * w[:, None])
            features = (acc / denom[:, None]).to(self.features.dtype)
        scores = {
            k: torch.zeros((num_groups, *v.shape[1:]), device=v.device, dtype=torch.float32).index_add(
                0, assign[kept], v[kept].float()
            )
            for k, v in self.scores.items()
        }
        if rep is not None:
            return self._reindex(assign, rep, features, size, scores)
        # reorder groups by their first member so the output keeps the input order
        order = torch.argsort(first, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(num_groups, device=order.device)
        new_assign = torch.where(kept, rank[assign.clamp(min=0)], assign)
        return self._reindex(
            new_assign, first[order], features[order], size[order], {k: v[order] for k, v in scores.items()}
        )

    def _reindex(
        self, assign: Tensor, rep: Tensor, features: Tensor, size: Tensor, scores: dict[str, Tensor]
    ) -> VisualTokens:
        src = self.source
        new_source = torch.where(src >= 0, assign[src.clamp(min=0)], src)
        return VisualTokens(
            features=features,
            item=self.item[rep],
            row=self.row[rep],
            col=self.col[rep],
            position=self.position[rep],
            size=size,
            source=new_source,
            grids=self.grids,
            items=self.items,
            scores=scores,
        )

    def with_features(self, features: Tensor) -> VisualTokens:
        """Same tokens with new features of shape (N, D')."""
        if features.shape[0] != len(self):
            raise ValueError(f"with_features: expected {len(self)} rows, got {features.shape[0]}")
        return VisualTokens(
            features, self.item, self.row, self.col, self.position, self.size, self.source, self.grids,
            self.items, dict(self.scores),
        )

    def with_scores(self, **scores: Tensor) -> VisualTokens:
        """Same tokens with these named per-token scores (N,) added or replaced."""
        return VisualTokens(self.features, self.item, self.row, self.col, self.position, self.size, self.source,
                            self.grids, self.items, {**self.scores, **scores})

    def members(self, i: int) -> Tensor:
        """Indices (into the original tokens) of the original tokens that token `i` stands for."""
        return torch.nonzero(self.source == i).flatten()
