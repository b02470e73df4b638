"""AIM token merging (stage A): iterative bipartite soft matching before the LLM.

Zhong, Liu, Li, Wang. "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning",
ICCV 2025, arXiv:2412.03248. Spec: shared/specs/image-reducers.md section 1.3. The matching and the merge run
on `tokenreduce.kernels` (`bipartite_match`, `scatter_mean`): Triton on a GPU, the torch reference elsewhere.

One iteration (as the release's `bipartite_soft_matching_merge`): tokens at even positions are sources, at odd
positions destinations; every source finds its most cosine-similar destination; the r best-matched sources are
merged into their destinations (each destination becomes the mean of itself and its sources) and leave. The
release calls this with r = N//2, then N//4 (LLaVA-OneVision video: 196 -> 98 -> 49 per frame), each call
merging at most t // 2; here the iterations run with r = min(t // 2, t - target) until the budget is met.

What matches the release, and what does not (each tested against a transcription of the release on fixed
inputs, tests/test_fidelity.py):
- **Video schedule.** On 196 tokens per frame every source is merged in both of the release's calls, so it
  leaves the destinations in their own order. `aim-merge(keep=0.25)` gives exactly the release's merge groups
  and order, and so does `aim-merge(keep=0.5)` applied twice (a merged token sits in its destination's place,
  so the second pass splits the same sequence as the release's second call).
- **Unmerged sources.** When some sources stay (odd token counts, or budgets that are not a halving), the
  release moves them to the front in descending-similarity order before the next iteration; we keep them in
  place (`order="spatial"`), so the next iteration pairs spatial neighbours again and positions keep their
  raster meaning (the release's own commented-out line restores that order). `order="release"` reproduces the
  release's shuffled splits, so the merge groups equal the release's on every schedule.
- **Output order.** A merged token enters the LLM at its destination's place (the representative of a group
  is the token it was merged into); the release puts the unmerged sources first. With every source merged
  (the video schedule) the two orders agree.
- **Rounding.** The budget is met exactly: `keep=0.25` of 729 tokens gives round(182.25) = 182 tokens; the
  release's N//2, N//4 calls leave 729 - 364 - 182 = 183. `tokens=183` gives the release's count. The last
  iteration merges only what is left to merge (the release returns None when r <= 0).
- **Sizes.** `weighted=True` averages by the number of original tokens each token stands for; the default
  `weighted=False` is the release's plain mean of the current tokens.
- **Metric.** `metric="features"` (default) matches on the merged features themselves (the release's LLaVA-
  OneVision path); `metric="keys"` matches on the vision tower's keys of the visual features (the keys the
  layer after the feature layer computes from them, CLS excluded), merged in lock-step with the features, as
  the release's LLaVA-1.5 path does with CLIP's layer-23 keys. The release merges those CLIP features before
  the projector; aim-merge merges the projected tokens (the VISUAL stage), so the groups are the release's but
  a merged token is the mean of projected tokens, not the projection of a mean (equal for a linear projector,
  close for LLaVA's two-layer MLP).
- **Ties** in the similarity ranking are broken by position (stable sort; the release's sort is unstable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import BudgetError, PlanError, UnsupportedModelError
from ..kernels import bipartite_match, scatter_mean
from ..plan import BudgetedReducer, Context, Probe, Stage, param
from ..registry import register_reducer
from ..tokens import VisualTokens

KEYS = "keys@feature"  # VisualTokens.scores entry of the vision tower's keys of the visual features


class BipartiteMerge(NamedTuple):
    """Result of `bipartite_merge` on G items of t tokens merged down to k.

    Attributes:
        features: (G, k, D) merged features (dtype of the input).
        assign: (G, t) long, the output token every input token ended up in.
        size: (G, k) fp32, how many input tokens each output token stands for.
        rep: (G, k) long, the input token each output token was merged into (its representative: the
            destination of its last merge, or itself).
        metric: (G, k, Dm) the merged metric, when one was given (else None).
    """

    features: Tensor
    assign: Tensor
    size: Tensor
    rep: Tensor
    metric: Tensor | None


@torch.no_grad()
def bipartite_merge(
    x: Tensor,
    target: int,
    weighted: bool = False,
    metric: Tensor | None = None,
    order: str = "spatial",
    *,
    backend: str = "auto",
) -> BipartiteMerge:
    """Merge each row of `x` down to `target` tokens by iterated bipartite soft matching (module docstring).

    Args:
        x: (G, t, D) features of G items with t tokens each, in the order that defines the even/odd split.
        target: tokens to keep per item, 1 <= target <= t.
        weighted: average by the number of original tokens each token stands for (else plain means).
        metric: optional (G, t, Dm) what the similarity is computed on (default: `x`), merged alongside.
        order: "spatial" (survivors keep their order between iterations) or "release" (unmerged sources go
            first in descending similarity, destinations after them, as the release's output).
        backend: kernel backend, "auto", "torch" or "triton".
    """
    g, t, d = x.shape
    if not 1 <= target <= t:
        raise BudgetError(f"bipartite_merge: target must be in [1, {t}], got {target}")
    if order not in ("spatial", "release"):
        raise PlanError(f"bipartite_merge: order must be 'spatial' or 'release', got {order!r}")
    if metric is not None and tuple(metric.shape[:2]) != (g, t):
        raise ValueError(f"bipartite_merge: metric must have shape ({g}, {t}, Dm), got {tuple(metric.shape)}")
    dev, dtype = x.device, x.dtype
    both = x.float() if metric is None else torch.cat([x.float(), metric.float()], -1)  # merged in lock-step
    assign = torch.arange(t, device=dev).expand(g, t)
    rep = torch.arange(t, device=dev).expand(g, t)
    size = torch.ones(g, t, device=dev)
    while t > target:
        m = both if metric is None else both[..., d:]
        src, dst = m[:, ::2], m[:, 1::2]
        r = min(t // 2, t - target)  # the release's cap: at most t // 2 merges per call (odd t: one source stays)
        best, match = bipartite_match(src, dst, backend=backend)  # (g, ceil(t/2))
        ranked = torch.argsort(best, dim=-1, descending=True, stable=True)  # sources by similarity
        merged_src = ranked[:, :r]
        label = torch.arange(t, device=dev).repeat(g, 1)
        label.scatter_(1, 2 * merged_src, 2 * match.gather(1, merged_src) + 1)  # merged sources -> destinations
        survivor = torch.ones(g, t, dtype=torch.bool, device=dev).scatter_(1, 2 * merged_src, False)
        kept = torch.argsort((~survivor).to(torch.int8), dim=1, stable=True)[:, : t - r]  # survivors, in order
        if order == "spatial":
            slot = survivor.cumsum(1) - 1  # survivors keep their order
            rep = rep.gather(1, kept)
        else:  # the release: [unmerged sources by descending similarity, then every destination in order]
            u = src.shape[1] - r
            slot = torch.zeros(g, t, dtype=torch.long, device=dev)
            slot.scatter_(1, 2 * ranked[:, r:], torch.arange(u, device=dev).expand(g, u).contiguous())
            slot[:, 1::2] = u + torch.arange(t // 2, device=dev)
            rep = torch.empty_like(kept).scatter_(1, slot.gather(1, kept), rep.gather(1, kept))
        new_id = slot.gather(1, label)  # (g, t) in [0, t - r)
        both, size = scatter_mean(both, new_id, t - r, size, weighted, backend=backend, check=False)
        assign = new_id.gather(1, assign)
        t -= r
    merged_metric = None if metric is None else both[..., d:].to(metric.dtype)
    return BipartiteMerge(both[..., :d].to(dtype), assign, size, rep, merged_metric)


@register_reducer
@dataclass
class AIMMerge(BudgetedReducer):
    """AIM's token merging (arXiv:2412.03248), per image or per frame, before the LLM.

    Budget: `tokens=` or `keep=` visual tokens per sample, split over its images/frames in proportion to
    their tokens; every image/frame (or group of `frames`) keeps at least one token, so the budget must be at
    least the number of them (else `BudgetError`).

    Fields:
        weighted: size-weighted means (default False: the release's plain means).
        frames: merge across n adjacent frames of a video at a time (1, the default: within each frame, as AIM
            does for LLaVA-OneVision; the paper finds cross-frame merging worse).
        metric: "features" (match on the tokens themselves, the release's video path) or "keys" (the vision
            tower's keys of the visual features, the release's LLaVA-1.5 path; needs a tower whose features
            reach the LLM unpooled).
        order: "spatial" (unmerged tokens stay in place between iterations) or "release" (the release's
            shuffle: unmerged sources first), see the module docstring.
    Shapes: each unit's (t, D) tokens -> (k, D); all units of the batch with the same (t, k) are merged in one
    batched call (one gather, none when the tokens already lie unit by unit).
    """

    name = "aim-merge"
    stage = Stage.VISUAL
    item_budgeted = True
    summary = "AIM: iterative bipartite merging of similar tokens per image/frame (ICCV'25)"

    weighted: bool = param(False, "merge by size-weighted means (the release: plain means)")
    frames: int = param(1, "merge across this many adjacent frames of a video (1: within each frame, as AIM)")
    metric: str = param("features", "match on 'features' (the tokens) or 'keys' (the tower's keys, as the "
                         "LLaVA-1.5 release)")
    order: str = param("spatial", "'spatial' (unmerged tokens stay in place between iterations) or 'release' "
                       "(the release's shuffled splits)")

    def validate(self) -> None:
        super().validate()
        if isinstance(self.frames, bool) or not isinstance(self.frames, int) or self.frames < 1:
            raise BudgetError(f"{self.name}: frames must be an integer >= 1, got {self.frames!r}")
        if not isinstance(self.weighted, bool):
            raise PlanError(f"{self.name}: weighted must be true or false, got {self.weighted!r}")
        if self.metric not in ("features", "keys"):
            raise PlanError(f"{self.name}: metric must be 'features' or 'keys', got {self.metric!r}")
        if self.order not in ("spatial", "release"):
            raise PlanError(f"{self.name}: order must be 'spatial' or 'release', got {self.order!r}")

    def probes(self) -> list[Probe]:
        return [Probe(KEYS, None, kind="keys")] if self.metric == "keys" else []

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

    def unit_budgets(self, vt: VisualTokens, units: list[list[int]]) -> list[int]:
        """Tokens each unit keeps: its items' shares of the budget; a `BudgetError` if one would keep none (unless
        another reducer sets the shares: QuoTA gives 0 to frames it drops)."""
        counts = vt.item_counts().tolist()
        total = self.budget(len(vt))
        live = [u for u in units if sum(counts[i] for i in u)]
        driven = getattr(self, "fixed_item_budgets", None) is not None  # QuoTA's per-frame shares: 0 drops a frame
        if total < len(live) and not driven:
            what = "frames" if any(vt.items[i].kind == "frame" for u in live for i in u) else "images or crops"
            per = "" if self.frames == 1 else f" (in groups of frames={self.frames})"
            raise BudgetError(
                f"{self.name}: a budget of {total} visual tokens is fewer than the {len(live)} {what}{per} of the "
                f"sample; merging keeps at least one token of each: give tokens >= {len(live)}"
                + (" or merge across frames with frames=n" if what == "frames" else "")
            )
        item_ks = self.item_budgets(vt)
        return [sum(item_ks[i] for i in u) for u in units]

    def reduce(self, batch: list[VisualTokens], contexts: list[Context]) -> list[VisualTokens]:
        dev = batch[0].features.device
        # every unit of every sample: where its tokens start in `order` (tokens of the concatenated batch,
        # unit by unit, in their current order within a unit), how many, and how many it keeps
        first, sizes, budgets, sample_units, sample_start = [], [], [], [], []
        orders, n0 = [], 0
        for vt in batch:
            units = self.units(vt)
            ks = self.unit_budgets(vt, units)
            unit_of_item = torch.empty(vt.num_items, dtype=torch.long)
            for u, items in enumerate(units):
                unit_of_item[items] = u
            unit_of_token = unit_of_item.to(dev)[vt.item]
            orders.append(torch.argsort(unit_of_token, stable=True) + n0)
            counts = torch.bincount(unit_of_token, minlength=len(units)).tolist()
            sample_units.append(len(sizes))
            sample_start.append(n0)
            for c, k in zip(counts, ks):
                first.append(n0)
                sizes.append(c)
                budgets.append(k)
                n0 += c
        sample_units.append(len(sizes))
        order = torch.cat(orders)
        feats = batch[0].features if len(batch) == 1 else torch.cat([v.features for v in batch])
        keys = self._keys(batch)
        in_order = bool(torch.equal(order, torch.arange(n0, device=dev)))  # tokens already lie unit by unit
        out_first = [0]
        for k in budgets:
            out_first.append(out_first[-1] + k)
        m_total = out_first[-1]
        assign = torch.full((n0,), -1, dtype=torch.long, device=dev)  # units that keep 0 tokens drop theirs
        rep = torch.empty(m_total, dtype=torch.long, device=dev)
        groups: dict[tuple[int, int], list[int]] = {}
        for u, (c, k) in enumerate(zip(sizes, budgets)):
            if c and k:
                groups.setdefault((c, k), []).append(u)
        out_feat = out_keys = None
        for (t, k), us in groups.items():
            starts = torch.tensor([first[u] for u in us], device=dev)
            idx = order[starts[:, None] + torch.arange(t, device=dev)]  # (U, t) token indices
            whole = in_order and len(us) * t == n0  # the whole batch, unit after unit: no gather
            x = feats.view(len(us), t, -1) if whole else feats[idx]
            metric = None if keys is None else (keys.view(len(us), t, -1) if whole else keys[idx])
            res = bipartite_merge(x, k, self.weighted, metric, self.order)
            base = torch.tensor([out_first[u] for u in us], device=dev)[:, None]
            assign[idx.flatten()] = (res.assign + base).flatten()
            slots = (base + torch.arange(k, device=dev)).flatten()
            rep[slots] = idx.gather(1, res.rep).flatten()
            if whole and len(groups) == 1:
                out_feat = res.features.reshape(m_total, -1)
                out_keys = None if res.metric is None else res.metric.reshape(m_total, -1)
                continue
            if out_feat is None:
                out_feat = feats.new_empty(m_total, feats.shape[1])
                out_keys = None if keys is None else keys.new_empty(m_total, keys.shape[1])
            out_feat[slots] = res.features.flatten(0, 1)
            if out_keys is not None:
                out_keys[slots] = res.metric.flatten(0, 1)
        if out_feat is None:  # nothing kept at all
            out_feat = feats.new_empty(0, feats.shape[1])
        out = []
        for s, vt in enumerate(batch):
            m0, m1 = out_first[sample_units[s]], out_first[sample_units[s + 1]]
            t0 = sample_start[s]
            merged = vt.group(assign[t0:t0 + len(vt)] - torch.where(assign[t0:t0 + len(vt)] >= 0, m0, 0), m1 - m0,
                              features=out_feat[m0:m1], rep=rep[m0:m1] - t0)
            if out_keys is not None:
                merged = merged.with_scores(**{KEYS: out_keys[m0:m1]})
            out.append(merged)
        return out

    def _keys(self, batch: list[VisualTokens]) -> Tensor | None:
        """The concatenated vision-tower keys of the batch (metric="keys"), or None."""
        if self.metric != "keys":
            return None
        for v in batch:
            k = v.scores.get(KEYS)
            if k is None or k.dim() != 2 or k.shape[0] != len(v):
                raise UnsupportedModelError(
                    f"{self.name}(metric='keys'): the model gave no vision-tower keys for its visual tokens (models "
                    "whose features come from the tower's last layer, or that pool frames after it, have none: "
                    "use metric='features')"
                )
        return batch[0].scores[KEYS] if len(batch) == 1 else torch.cat([v.scores[KEYS] for v in batch])
