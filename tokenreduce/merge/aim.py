"""AIM token merging (stage A): iterative bipartite soft matching before the LLM.

Zhong, Liu, Li, Wang. "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning",
ICCV 2025, arXiv:2412.03248. Spec: shared/specs/image-reducers.md section 1.3.

Differences from the released code, on purpose (each one a bug or a loss there):
- the budget is met exactly: the last iteration merges only what is left to merge (no crash at r <= 0);
- the spatial order of surviving tokens is kept, so the even/odd split of the next iteration pairs
  neighbours again (the release shuffles tokens after iteration 1);
- sizes are tracked, and `weighted=True` gives size-weighted means (the release averages a token that
  stands for 4 patches with equal weight to a single patch; `weighted=False` reproduces that);
- ties in the similarity ranking are broken by position (stable sort), so the result is deterministic.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import BudgetError
from ..plan import BudgetedReducer, Context, Stage, param
from ..registry import register_reducer
from ..tokens import VisualTokens


@torch.no_grad()
def bipartite_merge(x: Tensor, target: int, weighted: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Merge each row of `x` down to `target` tokens by iterated bipartite soft matching.

    Each iteration splits the tokens into even positions (sources) and odd positions (destinations),
    matches every source to its most cosine-similar destination, merges the `r` best-matched sources
    into their destinations (the group's mean) and keeps the rest, with r = min(#sources, t - target).

    Args:
        x: (G, t, D) features of G items with t tokens each.
        target: tokens to keep per item, 1 <= target <= t.
        weighted: average by the number of original tokens each token stands for.

    Returns:
        merged: (G, target, D) merged features (dtype of `x`).
        assign: (G, t) long, the output token each input token ended up in.
        size: (G, target) float, how many input tokens each output token stands for.
    """
    g, t, d = x.shape
    if not 1 <= target <= t:
        raise ValueError(f"bipartite_merge: target must be in [1, {t}], got {target}")
    dtype = x.dtype
    x = x.float()
    assign = torch.arange(t, device=x.device).expand(g, t)
    size = torch.ones(g, t, device=x.device)
    while t > target:
        metric = torch.nn.functional.normalize(x, dim=-1)
        a, b = metric[:, ::2], metric[:, 1::2]
        r = min(a.shape[1], t - target)
        best, dst = (a @ b.transpose(1, 2)).max(dim=-1)  # (g, ta)
        order = torch.argsort(best, dim=-1, descending=True, stable=True)[:, :r]  # sources to merge
        src_pos = 2 * order
        dst_pos = 2 * dst.gather(1, order) + 1
        label = torch.arange(t, device=x.device).repeat(g, 1).scatter_(1, src_pos, dst_pos)
        survivor = torch.ones(g, t, dtype=torch.bool, device=x.device).scatter_(1, src_pos, False)
        new_id = (survivor.cumsum(1) - 1).gather(1, label)  # (g, t) in [0, t - r)
        w = size if weighted else torch.ones_like(size)
        acc = torch.zeros(g, t - r, d, device=x.device).scatter_add_(
            1, new_id[..., None].expand(-1, -1, d), x * w[..., None]
        )
        den = torch.zeros(g, t - r, device=x.device).scatter_add_(1, new_id, w)
        x = acc / den[..., None]
        size = torch.zeros(g, t - r, device=x.device).scatter_add_(1, new_id, size)
        assign = new_id.gather(1, assign)
        t -= r
    return x.to(dtype), assign, size


@register_reducer
@dataclass
class AIMMerge(BudgetedReducer):
    """AIM's token merging (arXiv:2412.03248), per image or per frame, before the LLM.

    Budget: `tokens=` or `keep=` visual tokens per sample (split over its images/frames in proportion
    to their tokens). `weighted=True` uses size-weighted means (the release: unweighted). `frames=n`
    merges across n adjacent frames of a video at a time (1, the default: within each frame, as AIM does
    for LLaVA-OneVision; the paper finds cross-frame merging worse). Applying the reducer twice with
    keep=0.5 gives AIM's video schedule (196 -> 98 -> 49 tokens per frame).
    Shapes: each unit's (t, D) projected tokens -> (k, D); all units with the same (t, k) are merged in
    one batched call.
    """

    name = "aim-merge"
    stage = Stage.VISUAL
    summary = "AIM: iterative bipartite merging of similar tokens per image/frame (ICCV'25)"

    weighted: bool = param(False, "merge by size-weighted means (the release: plain means)")
    frames: int = param(1, "merge across this many adjacent frames of a video (1: within each frame, as AIM)")

    def validate(self) -> None:
        super().validate()
        if isinstance(self.frames, bool) or not isinstance(self.frames, int) or self.frames < 1:
            raise BudgetError(f"{self.name}: frames must be an integer >= 1, got {self.frames!r}")

    def units(self, vt: VisualTokens) -> list[list[int]]:
        """Items merged together: each item alone, or runs of `frames` adjacent frames of one video."""
        out: list[list[int]] = []
        for i, info in enumerate(vt.items):
            prev = vt.items[i - 1] if i else None
            joins = (self.frames > 1 and info.kind == "frame" and prev is not None and prev.kind == "frame"
                     and prev.image == info.image and len(out[-1]) < self.frames)
            if joins:
                out[-1].append(i)
            else:
                out.append([i])
        return out

    def reduce(self, batch: list[VisualTokens], contexts: list[Context]) -> list[VisualTokens]:
        # gather every (sample, item) and batch the ones of equal (t, k) together
        groups: dict[tuple[int, int], list[tuple[int, int, Tensor]]] = defaultdict(list)
        budgets = []
        for s, vt in enumerate(batch):
            item_ks = self.item_budgets(vt)
            units = self.units(vt)
            ks = [sum(item_ks[i] for i in u) for u in units]
            budgets.append(ks)
            for i, (u, k) in enumerate(zip(units, ks)):
                idx = torch.nonzero(torch.isin(vt.item, torch.tensor(u, device=vt.item.device))).flatten()
                if idx.numel():
                    groups[(idx.numel(), k)].append((s, i, idx))
        assigns = [torch.full((len(vt),), -1, dtype=torch.long, device=vt.features.device) for vt in batch]
        feats: list[list[tuple[Tensor, Tensor]]] = [[] for _ in batch]  # (group ids, features)
        offsets = [torch.tensor([0, *ks], device=vt.features.device).cumsum(0) for vt, ks in zip(batch, budgets)]
        for (_, k), members in groups.items():
            x = torch.stack([batch[s].features[idx] for s, _, idx in members])
            merged, assign, _ = bipartite_merge(x, k, self.weighted)
            for j, (s, item, idx) in enumerate(members):
                base = offsets[s][item]
                assigns[s][idx] = assign[j] + base
                feats[s].append((base + torch.arange(k, device=merged.device), merged[j]))
        out = []
        for s, vt in enumerate(batch):
            total = int(offsets[s][-1])
            f = torch.empty(total, vt.features.shape[1], dtype=vt.features.dtype, device=vt.features.device)
            for ids, m in feats[s]:
                f[ids] = m
            out.append(vt.group(assigns[s], total, features=f))
        return out
