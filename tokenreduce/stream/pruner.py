"""STC-Pruner: keep each frame's most novel tokens (STC, "Accelerating Streaming Video Large Language Models via
Hierarchical Token Compression", arXiv 2512.00891, CVPR 2026; spec: shared/specs/video-reducers.md section 2.4).

A VISUAL reducer: after the projector (and the model's pooling), every frame keeps its `budget` tokens least
similar to two anchors, in raster order:

- the frame's own mean direction (spatial anchor: the mean of the frame's normalised tokens, not renormalised);
- the running mean of every frame seen so far in the stream, this one included (temporal memory, normalised).

Scores are computed in the `channel_keep` share of channels with the lowest variance over the frame's tokens
(the output keeps every channel). "gaussian" (the released code, which produced the published numbers):
similarity = sum over bandwidths a in {1/8, 1/4, 1/2, 1, 2} of exp(-|f - anchor|^2 / (2a)) to both anchors, keep
the lowest. "dual-anchor" (the refactor's option): novelty = alpha (1 - cos(f, memory)) + (1 - alpha)
(1 - cos(f, frame mean)), keep the highest.

Differences from the official code, on purpose (spec 2.11), unless `faithful=True`:

- the temporal memory belongs to one stream: a `PrunerMemory` per `StreamingSession` (reset by `reset()`), and
  offline a fresh one per sample, frames in order. The release keeps it on the model and never resets it, so the
  anchor leaks across videos (and two streams would share it);
- the memory is a running sum of full-width frame means, projected onto the frame's channel subset when scoring.
  The release stores each chunk's mean in that chunk's own channel subset and averages vectors whose coordinates
  are different channels. It also re-concatenates the whole history every frame; a running sum is O(1).

`faithful=True` reproduces both behaviours (one memory on the reducer object, shared by every call and never
reset; means averaged across different channel subsets) for matching the published numbers.

Every kept token carries its novelty in `scores["stc"]` (higher = more novel), which a session's score-based
eviction reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import PlanError
from ..plan import BudgetedReducer, Context, Stage, param
from ..registry import register_reducer
from ..tokens import VisualTokens

BANDWIDTHS = (0.125, 0.25, 0.5, 1.0, 2.0)
STRATEGIES = ("gaussian", "dual-anchor")
#: the paper's budget, 64 of LLaVA-OneVision's 196 tokens per frame
PAPER_KEEP = 0.33


@dataclass
class PrunerMemory:
    """The temporal anchor of one stream: a running sum of frame means and their count.

    Attributes:
        total: (D,) float32 sum of the frames' mean features (clean), or (D',) sum of means each taken in its own
            frame's channel subset (faithful); None before the first frame.
        count: frames summed.
    """

    total: Tensor | None = None
    count: int = 0

    def add(self, mean: Tensor) -> Tensor:
        """Add one frame's mean (D,) and return the running mean, this frame included."""
        self.total = mean.clone() if self.total is None else self.total + mean
        self.count += 1
        return self.total / self.count

    def reset(self) -> None:
        self.total, self.count = None, 0


def gaussian_similarity(f: Tensor, anchor: Tensor) -> Tensor:
    """Multi-bandwidth Gaussian similarity: f (..., P, D'), anchor broadcastable to it -> (..., P)."""
    d2 = (f - anchor).pow(2).sum(-1)
    return sum(torch.exp(-d2 / (2 * a)) for a in BANDWIDTHS)


def low_variance_channels(x: Tensor, keep: float) -> Tensor:
    """Indices (D',) of the max(1, int(D * keep)) channels of x (P, D) with the lowest variance over tokens."""
    d = x.shape[-1]
    n = max(1, int(d * keep))
    var = x.var(0, unbiased=False)
    return torch.argsort(var, stable=True)[:n]


def frame_novelty(x: Tensor, memory: PrunerMemory, channel_keep: float = 0.5, strategy: str = "gaussian",
                  alpha: float = 0.5, faithful: bool = False) -> Tensor:
    """Novelty (P,) of one frame's tokens x (P, D) (higher = keep first); adds the frame to `memory`.

    gaussian: minus the summed Gaussian similarity to the frame anchor and the memory anchor.
    dual-anchor: alpha * (1 - cos to the memory) + (1 - alpha) * (1 - cos to the frame's mean).
    """
    xf = x.float()
    ch = low_variance_channels(xf, channel_keep)
    f = xf[:, ch]
    mean = xf.mean(0)
    m = memory.add(mean[ch]) if faithful else memory.add(mean)[ch]
    m_hat = m / m.norm().clamp_min(1e-12)
    if strategy == "gaussian":
        f_hat = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        spatial = f_hat.mean(0)  # not renormalised, as in the released code
        return -(gaussian_similarity(f_hat, spatial) + gaussian_similarity(f_hat, m_hat))
    spatial = f.mean(0)
    cos_m = torch.nn.functional.cosine_similarity(f, m_hat[None], dim=-1, eps=1e-12)
    cos_s = torch.nn.functional.cosine_similarity(f, spatial[None], dim=-1, eps=1e-12)
    return alpha * (1 - cos_m) + (1 - alpha) * (1 - cos_s)


@register_reducer
@dataclass
class STCPrune(BudgetedReducer):
    """STC-Pruner: per frame, the tokens least similar to the frame's mean and to the stream's memory.

    Fields:
        keep: fraction of each frame's tokens to keep, rounded per frame (default 0.33, the paper's 64 of 196);
            or tokens= per sample (split evenly over its frames; in a `StreamingSession` each frame is a sample).
        channel_keep: share of lowest-variance channels the scores are computed in (0.5).
        strategy: "gaussian" (released code, default) or "dual-anchor".
        alpha: the memory's weight in "dual-anchor".
        faithful: reproduce the release's memory (shared, never reset, mixed channel subsets); see module doc.
    """

    name: ClassVar[str] = "stc-prune"
    stage: ClassVar[Stage] = Stage.VISUAL
    summary: ClassVar[str] = "STC-Pruner: per frame, the tokens most novel vs the frame mean and the stream memory"

    keep: float | None = param(PAPER_KEEP, "fraction of each frame's tokens to keep (the paper's 64 of 196)")
    channel_keep: float = param(0.5, "share of lowest-variance channels the novelty scores are computed in")
    strategy: str = param("gaussian", "novelty score: 'gaussian' (the release) or 'dual-anchor'")
    alpha: float = param(0.5, "the stream memory's weight in 'dual-anchor'")
    faithful: bool = param(False, "the release's memory: shared across streams, never reset")

    def __post_init__(self) -> None:
        if self.tokens is not None and self.keep == PAPER_KEEP:
            self.keep = None  # tokens= replaces the default fraction
        super().__post_init__()
        self._memory = PrunerMemory()  # faithful mode's one memory (not a hyperparameter)

    def validate(self) -> None:
        super().validate()
        if isinstance(self.channel_keep, bool) or not isinstance(self.channel_keep, (int, float)) or not (
                0.0 < float(self.channel_keep) <= 1.0):
            raise PlanError(f"stc-prune: channel_keep must be in (0, 1], got {self.channel_keep!r}")
        if self.strategy not in STRATEGIES:
            raise PlanError(f"stc-prune: strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise PlanError(f"stc-prune: alpha must be in [0, 1], got {self.alpha!r}")
        if not isinstance(self.faithful, bool):
            raise PlanError(f"stc-prune: faithful must be true or false, got {self.faithful!r}")

    def item_budgets(self, tokens: VisualTokens) -> list[int]:
        """keep=: that fraction of every frame (STC's constant per-frame budget, so a frame keeps the same tokens
        offline and in a stream); tokens=: the sample's budget split evenly over its frames."""
        if self.keep is None:
            return super().item_budgets(tokens)
        return [self.budget(int(n)) if n else 0 for n in tokens.item_counts().tolist()]

    def new_memory(self) -> PrunerMemory:
        """The memory a new stream starts with (faithful: the reducer's one shared memory)."""
        return self._memory if self.faithful else PrunerMemory()

    def reduce_sample(self, tokens: VisualTokens, ctx: Context) -> VisualTokens:
        return self.reduce_frames(tokens, self.new_memory())

    def reduce_frames(self, tokens: VisualTokens, memory: PrunerMemory) -> VisualTokens:
        """Prune every item of `tokens` in frame order (ItemInfo.index, then item order), updating `memory`."""
        budgets = self.item_budgets(tokens)
        order = sorted(range(tokens.num_items), key=lambda i: (tokens.items[i].index, i))
        novelty = torch.zeros(len(tokens), dtype=torch.float32, device=tokens.features.device)
        keep = []
        for i in order:
            idx = torch.nonzero(tokens.item == i).flatten()
            if idx.numel() == 0:
                continue
            s = frame_novelty(tokens.features[idx], memory, self.channel_keep, self.strategy, self.alpha,
                              self.faithful)
            novelty[idx] = s
            top = torch.argsort(-s, stable=True)[: budgets[i]]
            keep.append(idx[top])
        index = torch.sort(torch.cat(keep)).values
        return tokens.with_scores(stc=novelty).select(index)
