"""AIM progressive pruning inside the LLM (stage B): PageRank importance, text always kept.

Zhong, Liu, Li, Wang. "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning",
ICCV 2025, arXiv:2412.03248. Spec: shared/specs/image-reducers.md sections 1.4, 1.5 and 1.10.

After layer l, with Z_h = q k^T * scale + mask (causal + padding) of layer l and all current tokens:

    M_h = softmax(Z_h / tau)                   row-stochastic, (B, H, L, L)
    pi0 = uniform over the sample's current tokens
    pi  <- (1 - d) pi M_h + d / N               `iters` times (d = damping, 0 in the paper)
    s_j = sqrt(mean_h pi_hj^2)                  RMS over heads

Every text token is kept; of the visual tokens the `floor(n_visual0 * rho[l])` best-scoring ones are kept,
where n_visual0 is the sample's visual count at the LLM input (rho is a fraction of the ORIGINAL count).

Retention schedule rho[l] (visual tokens kept after layer l, i.e. seen by layer l + 1):
rho[l] = 1 for l < start, then max(0, 1 - (l - start + 1) * step). `start` is the first layer after which
tokens are dropped: an int is a layer index, a float in [0, 1) a fraction of the depth (floor(start * depth)),
None the released schedules: 13 for 32 layers (Vicuna-7B, LLaVA-1.5: layers <= 13 see 100 %, 14 sees 87.5 %,
..., 20 sees 12.5 %, >= 21 see 0 %), 14 for 28 layers (Qwen2-7B, LLaVA-OV: 15 sees 87.5 %, >= 22 see 0 %),
and floor(0.45 * depth) for other depths (so a 4-layer model drops after layers 1 and 2).

Differences from the released code, on purpose:
- tokens are removed physically (the release only masks keys), with the engine of `tokenreduce.llm`;
- importance is computed only where rho steps down to a non-zero value (the release scores every layer;
  where rho = 0 every visual token goes without scoring);
- pi0 is uniform over the surviving tokens (the release starts from all N positions, dropped ones included,
  spec section 1.10), and ties are broken by position (stable sort), so the kept set is deterministic;
- per-sample budgets (the release takes the text count of sample 0 for the whole batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import PlanError
from ..llm import LayerView, PrefillReducer
from ..plan import Stage, param
from ..registry import register_reducer

PAPER_START = {32: 13, 28: 14}  # released schedules: LLaVA-1.5 (Vicuna-7B), LLaVA-OV (Qwen2-7B)
DEFAULT_FRACTION = 0.45


def pagerank(probs: Tensor, valid: Tensor, iters: int = 5, damping: float = 0.0) -> Tensor:
    """AIM importance: `iters` power iterations of pi <- (1 - d) pi M + d / N, then RMS over heads.

    Args:
        probs: (B, H, L, L) row-stochastic attention (fp32).
        valid: (B, L) bool, current tokens (pi0 is uniform over them, padding gets no mass).

    Returns:
        (B, L) fp32 scores.
    """
    w = valid.float()
    uniform = (w / w.sum(1, keepdim=True).clamp(min=1))[:, None, None, :]  # (B, 1, 1, L)
    pi = uniform.expand(-1, probs.shape[1], -1, -1)
    for _ in range(iters):
        pi = pi @ probs
        if damping:
            pi = (1 - damping) * pi + damping * uniform
    return pi[:, :, 0].square().mean(1).sqrt()


@register_reducer
@dataclass
class AIMPrune(PrefillReducer):
    """AIM PageRank pruning of visual tokens inside the LLM (see the module docstring).

    Fields: start (first layer after which tokens drop; int layer, float fraction of depth, None = paper),
    step (retention lost per layer), tau (softmax temperature), iters (power iterations), damping.
    """

    name = "aim-prune"
    stage = Stage.PREFILL
    summary = "AIM: PageRank importance from LLM attention, progressive in-LLM visual token pruning"

    start: int | float | None = param(None, "first layer after which tokens drop: a layer index or a fraction of "
                                      "depth", shown="13 of 32, 14 of 28, else 0.45 x depth")
    step: float = param(0.125, "share of the original visual tokens dropped per layer from there on")
    tau: float = param(0.1, "softmax temperature of the attention PageRank runs on")
    iters: int = param(5, "PageRank power iterations")
    damping: float = param(0.0, "PageRank damping (0 in the paper)")

    def validate(self) -> None:
        s = self.start
        if s is not None:
            if isinstance(s, bool) or not isinstance(s, (int, float)):
                raise PlanError(f"aim-prune: start= must be a layer index or a fraction of depth, got {s!r}")
            if isinstance(s, int) and s < 0:
                raise PlanError(f"aim-prune: start= must be a layer index >= 0, got {s}")
            if isinstance(s, float) and not 0.0 <= s < 1.0:
                raise PlanError(f"aim-prune: start= as a fraction of depth must be in [0, 1), got {s}")
        for key, low in (("step", 0.0), ("tau", 0.0)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > low:
                raise PlanError(f"aim-prune: {key}= must be a positive number, got {v!r}")
        if self.step > 1:
            raise PlanError(f"aim-prune: step= must be in (0, 1], got {self.step}")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise PlanError(f"aim-prune: iters= must be an integer >= 1, got {self.iters!r}")
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) or not 0 <= self.damping < 1:
            raise PlanError(f"aim-prune: damping= must be in [0, 1), got {self.damping!r}")

    def first_layer(self, num_layers: int) -> int:
        """The first layer after which visual tokens are dropped."""
        if self.start is None:
            first = PAPER_START.get(num_layers, math.floor(DEFAULT_FRACTION * num_layers))
        elif isinstance(self.start, float):
            first = math.floor(self.start * num_layers)
        else:
            first = self.start
        if first > num_layers - 2:
            raise PlanError(
                f"aim-prune: start={self.start!r} gives layer {first}, but a {num_layers}-layer decoder can only "
                f"drop after layers 0..{num_layers - 2}"
            )
        return first

    def retention(self, num_layers: int) -> list[float]:
        """rho[l] for every layer: the fraction of the original visual tokens kept after layer l."""
        first = self.first_layer(num_layers)
        return [1.0 if i < first else max(0.0, 1.0 - (i - first + 1) * self.step) for i in range(num_layers)]

    def acts_after(self, num_layers: int) -> list[int]:
        rho = self.retention(num_layers)
        return [i for i in range(num_layers - 1) if rho[i] < (rho[i - 1] if i else 1.0)]

    def wants_attention(self, layer: int, num_layers: int) -> bool:
        return 0.0 < self.retention(num_layers)[layer] < 1.0  # rho = 0 drops every visual token unscored

    def importance(self, view: LayerView) -> Tensor:
        """(B, L) fp32 PageRank scores of the current tokens at `view.layer`."""
        probs = view.attention(None, temperature=self.tau)
        return pagerank(probs, view.valid, self.iters, self.damping)

    def select(self, view: LayerView, contexts: Any) -> Tensor:
        rho = self.retention(view.num_layers)[view.layer]
        visual = view.visual
        if rho >= 1.0:
            return torch.ones_like(visual)
        if rho <= 0.0:
            return ~visual | view.protected
        score = self.importance(view)
        budget = torch.floor(view.n_visual0.double() * rho + 1e-9).long()  # (B,)
        key = score.masked_fill(~visual, float("-inf")).masked_fill(view.protected, float("inf"))
        order = torch.argsort(key, dim=1, descending=True, stable=True)
        ranks = torch.arange(key.shape[1], device=key.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(1, order, ranks)
        return ~visual | view.protected | (rank < budget[:, None])
