"""HiRED: High-Resolution Early Dropping (Arif et al., AAAI-25, arXiv:2408.10945).

Spec: shared/specs/image-reducers.md section 2. A fixed visual-token budget per sample is split over its
images (by token count); inside an anyres image a fraction `alpha` goes to the overview and the rest to
the crops in proportion to each crop's "visual content score": the CLS attention that the overview pays,
at an early vision layer, to the overview patches lying inside the crop's region. Each partition then
keeps its top tokens by CLS attention at the feature layer, summed over heads. Kept tokens stay in their
original order. Single-grid images (LLaVA-1.5) are one partition.

Rounding: the sample's budget is ``round(keep x N)`` (halves up), as for every budgeted reducer, where the
release truncates (``int(partitions x 576 x rate)``): one token more at some ratios, e.g. keep=0.3 of 576
tokens gives 173 here and 172 in the release (0.2 and 0.4 of 576 and 2880, the paper's settings, agree).
A rounded budget gives every reducer the same token count for the same `keep`, so their comparison is fair;
`tokens=` sets the count exactly. Inside an anyres image the overview's share is truncated as in the release
(``floor(alpha x budget)``), and the crops' shares are rounded by largest remainder so that they sum exactly
(the release truncates each crop's share and loses the remainders).

Differences from the released code, on purpose (each one a bug there):
- crops get their share from the overview patches that really lie inside them (the release reshapes the
  24x24 map into horizontal bands, so crop (0, 0) is scored by the top rows of the whole image);
- the allocation uses attention mass, as in the paper (`allocation="count"` gives the release's count of
  top-attended patches, still mapped spatially);
- every image of a batch gets its own scores (the release uses batch element 0 for all);
- the budget is met exactly: largest-remainder rounding, crops that cannot take their share pass it on,
  and padding tokens are never counted or selected (anyres unpadding happens before this reducer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import kernels
from ..errors import PlanError
from ..plan import BudgetedReducer, Context, Probe, Stage, allocate, param, split_budget
from ..registry import register_reducer
from ..tokens import VisualTokens


@register_reducer
@dataclass
class HiRED(BudgetedReducer):
    """HiRED token selection by CLS attention with budgets across anyres partitions.

    Fields:
        keep: fraction of the sample's visual tokens to keep (default 0.2, the paper's 20%); or tokens=.
        alpha: share of an anyres image's budget for its overview (0.5 in the paper).
        init_layer: vision layer whose CLS attention on the overview allocates budgets to crops (0).
        final_layer: vision layer whose CLS attention ranks tokens; None = the layer that produces the
            visual features (22 on CLIP-L/336 with LLaVA's penultimate-layer features).
        allocation: "mass" (paper: CLS attention summed over a crop's region) or "count" (release: how
            many of the overview's top int(N * (1 - alpha)) patches lie in the crop).
    """

    name = "hired"
    stage = Stage.VISUAL
    summary = "HiRED: CLS-attention token selection, budget split across anyres crops (AAAI-25)"

    keep: float | None = param(0.2, "fraction of the sample's visual tokens to keep (the paper's 20%; or tokens=)")
    alpha: float = param(0.5, "share of an anyres image's budget for its overview (the rest goes to the crops)")
    init_layer: int = param(0, "vision layer whose CLS attention on the overview splits the budget over crops")
    final_layer: int | None = param(None, "vision layer whose CLS attention ranks tokens",
                                    shown="the feature layer")
    allocation: str = param("mass", "crop budgets by CLS attention mass over the crop (paper) or 'count' (release)")

    def __post_init__(self) -> None:
        if self.tokens is not None and self.keep == 0.2:
            self.keep = None  # tokens= replaces the default fraction
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.alpha, (int, float)) or not 0.0 <= float(self.alpha) <= 1.0:
            raise PlanError(f"hired: alpha must be in [0, 1], got {self.alpha!r}")
        if self.allocation not in ("mass", "count"):
            raise PlanError(f"hired: allocation must be 'mass' or 'count', got {self.allocation!r}")
        for f in ("init_layer", "final_layer"):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise PlanError(f"hired: {f} must be a vision layer index, got {v!r}")

    @property
    def _names(self) -> tuple[str, str]:
        final = "feature" if self.final_layer is None else str(self.final_layer)
        return f"cls@{self.init_layer}", f"cls@{final}"

    def probes(self) -> list[Probe]:
        init, final = self._names
        return [Probe(init, self.init_layer), Probe(final, self.final_layer)]

    def reduce_sample(self, tokens: VisualTokens, ctx: Context) -> VisualTokens:
        init_name, final_name = self._names
        if final_name not in tokens.scores:
            raise RuntimeError("hired: no CLS attention was recorded (the adapter did not run the probes)")
        final = tokens.scores[final_name]
        images = torch.tensor([tokens.items[i].image for i in range(tokens.num_items)], device=final.device)
        img_of_token = images[tokens.item]
        n_images = int(images.max()) + 1
        counts = torch.bincount(img_of_token, minlength=n_images).tolist()
        budgets = split_budget(self.budget(len(tokens)), counts, floor=0)
        per_item = [0] * tokens.num_items
        for img, budget in enumerate(budgets):
            parts = [i for i in range(tokens.num_items) if tokens.items[i].image == img]
            for item, k in zip(parts, self.partition_budgets(tokens, parts, budget, init_name)):
                per_item[item] = k
        # every partition's top tokens by feature-layer CLS attention in one call (ties: the earlier token)
        k = torch.tensor(per_item, dtype=torch.long, device=final.device)
        keep = kernels.segment_topk(final, tokens.item, k)
        return tokens.select(torch.nonzero(keep).flatten())

    def partition_budgets(self, tokens: VisualTokens, parts: list[int], budget: int, init_name: str) -> list[int]:
        """Budget of each item (partition) of one image; sums exactly to `budget`."""
        caps = [int((tokens.item == i).sum()) for i in parts]
        kinds = [tokens.items[i].kind for i in parts]
        if "overview" not in kinds or len(parts) == 1:
            return split_budget(budget, caps, floor=0)
        ov = parts[kinds.index("overview")]
        crops = [i for i in parts if tokens.items[i].kind == "crop"]
        n_ov = min(math.floor(float(self.alpha) * budget), caps[parts.index(ov)])
        weights = self.crop_scores(tokens, ov, crops, init_name)
        crop_caps = [caps[parts.index(c)] for c in crops]
        n_sub = min(budget - n_ov, sum(crop_caps))
        n_ov = budget - n_sub  # crops too small for their share: the overview takes the rest
        crop_budgets = dict(zip(crops, allocate(n_sub, weights, crop_caps)))
        return [n_ov if i == ov else crop_budgets.get(i, 0) for i in parts]

    def crop_scores(self, tokens: VisualTokens, overview: int, crops: list[int], init_name: str) -> list[float]:
        """Visual content score of each crop: the overview's init-layer CLS attention inside its region."""
        idx = torch.nonzero(tokens.item == overview).flatten()
        attn = tokens.scores[init_name][idx]
        if self.allocation == "count":
            top = int(attn.numel() * (1.0 - float(self.alpha)))
            mark = torch.zeros_like(attn)
            mark[torch.argsort(attn, descending=True, stable=True)[:top]] = 1.0
            attn = mark
        h, w = tokens.grids[overview]
        cy = (tokens.row[idx].float() + 0.5) / h  # overview patch centres, as fractions of the image
        cx = (tokens.col[idx].float() + 0.5) / w
        return [float(_in_region(cy, cx, tokens.items[c].region) @ attn.float()) for c in crops]


def _in_region(cy: Tensor, cx: Tensor, region: tuple[float, float, float, float]) -> Tensor:
    top, left, bottom, right = region
    return ((cy >= top) & (cy < bottom) & (cx >= left) & (cx < right)).float()
