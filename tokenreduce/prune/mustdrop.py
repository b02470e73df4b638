"""MustDrop stages 2 and 3: dual-attention dropping in prefill, and the output-aware KV cache cut.

Liu, Shi, Hong, Hu, Yin, Zhang. "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large
Language Model", arXiv:2411.10803. Spec: shared/specs/image-reducers.md sections 3.3-3.5, 3.8, 3.10.
(Stage 1, the 3x3 window merge in the vision encoder and the key set, lives with the ENCODER reducers; the key
set reaches these stages as the engine's `protected` tokens.)

Prefill (`mustdrop-prefill`), after each layer of `layers`: text queries = the valid tokens after the sample's
last visual token (question and answer prefix); A' = mean over heads of the attention probabilities of those
rows on the visual keys (softmax over all current keys); G_j = sum_t A'[t, j], I_j = max_t A'[t, j]. A visual
token is dropped iff G_j < global_thr * sum_m G_m AND I_j < individual_thr, unless protected.

Threshold presets (LLaVA-1.5-7B, from the release's README and scripts; the token counts are MustDrop's
layer-averaged, benchmark-averaged visual length, not a per-sample cap):

    (global_thr, individual_thr) = (0.001, 0.001)   ~192 tokens   (default)
                                   (0.0012, 0.001)  ~128 tokens
                                   (0.011, 0.01)    ~64 tokens    (VizWiz-64 script: (0.005, 0.001))

Budget form (`tokens=` or `keep=`; ours, the release has only thresholds): the visual tokens averaged over all
decoder layers, the number MustDrop's tables quote, is met exactly. `budget_schedule` fixes how many tokens
survive each pruning layer (falling geometrically, never below the key set), and each drop keeps the tokens
that rank highest by s_j = max(G_j / (global_thr * sum_m G_m), I_j / individual_thr): the threshold rule drops
exactly the tokens with s_j < 1, so at the count the rule would keep, both keep the same tokens. The thresholds
then only weigh the two criteria against each other.

Layers: `layers=None` (the default) is the release's 2/6/10/14 of a 32-layer decoder moved to the model's depth
(`scaled_layers`: the layers after which the same share of the depth has run), so 32 layers get exactly
2/6/10/14 and the shipped 6-layer models 0/1/2.

Decode (`mustdrop-decode`), once after prefill: the caches of the layers from the first to the last pruning
layer (inclusive; 2..14 on 32 layers) are cut to the tokens that survived the final prefill drop; earlier layers
keep everything, later ones already hold exactly the survivors.

Differences from the released code, on purpose (spec section 3.8):
- per sample, any batch size (the release scores batch element 0 and applies it to the whole batch);
- surviving tokens keep their ORIGINAL positions and decoding continues from the original length, for every
  layer. The release compacts positions at each prefill stage and gives the new token the cache length of each
  layer, which makes relative positions inconsistent (even negative) in layers 2-14 after the cut;
- any depth (the release hard-codes 32 layers) and any attention implementation (q/k captured, sdpa kept).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import BudgetError, PlanError
from ..llm import CacheState, DecodeReducer, LayerView, PrefillReducer
from ..plan import Reducer, Stage, param
from ..registry import register_reducer

RELEASE_LAYERS = (2, 6, 10, 14)
RELEASE_DEPTH = 32  # Vicuna-7B, the LLM of LLaVA-1.5-7B


def scaled_layers(num_layers: int, release: Sequence[int] = RELEASE_LAYERS, depth: int = RELEASE_DEPTH) -> list[int]:
    """The release's pruning layers (2/6/10/14 of a 32-layer decoder) moved to a `num_layers`-deep one.

    Each layer l becomes the one after which the same share of the depth has run: round((l + 1) * D / 32) - 1,
    kept in 0..D-2; layers that coincide are merged. 32 layers give exactly 2/6/10/14; 28 give 2/5/9/12, 16 give
    1/3/5/7, 6 give 0/1/2, 4 give 0/1, 2 give 0.
    """
    if num_layers < 2:
        raise PlanError(f"mustdrop: a {num_layers}-layer decoder has no layer to drop after (it needs 2 or more)")
    out: list[int] = []
    for layer in release:
        x = min(max(math.floor((layer + 1) * num_layers / depth + 0.5) - 1, 0), num_layers - 2)
        if not out or x > out[-1]:
            out.append(x)
    return out


def layer_spans(layers: Sequence[int], num_layers: int) -> list[int]:
    """How many decoder layers see each visual count: [layers before and at the first drop, then one entry per
    drop]. E.g. layers 2/6/10/14 of 32 -> [3, 4, 4, 4, 17]."""
    edges = [layer + 1 for layer in layers] + [num_layers]
    return [edges[0]] + [b - a for a, b in zip(edges, edges[1:])]


def budget_schedule(n0: int, protected: int, spans: Sequence[int], total: int) -> list[int]:
    """Visual tokens to keep after each pruning layer so that the visual tokens summed over the decoder layers equal
    `total` (the layer-average target times the depth).

    Args:
        n0: visual tokens entering the LLM; protected: how many of them may never be dropped (the key set).
        spans: `layer_spans` of the pruning layers; total: the target sum over all layers.

    The counts fall geometrically (every drop keeps the same share, as the threshold rule roughly does), are
    non-increasing, never below `protected`, and sum to `total` exactly whenever integer counts allow it (the
    search below finds such a schedule whenever one exists: a test checks it against an exhaustive search);
    otherwise they sum to the closest total below it. A target under what the first drop can reach
    (spans[0] * n0 + the rest at `protected`) raises `BudgetError`; a target at or above n0 keeps everything.
    """
    w = list(spans[1:])
    rest = total - spans[0] * n0
    if rest < protected * sum(w):
        floor = (spans[0] * n0 + protected * sum(w)) / sum(spans)
        raise BudgetError(
            f"mustdrop: a layer average of {total / sum(spans):g} visual tokens is out of reach: the "
            f"{spans[0]} layer(s) before the first drop see all {n0}, so the average cannot go below {floor:.1f} "
            f"with these layers on a {sum(spans)}-layer decoder; drop earlier (layers=[0, ...]) or ask for more"
        )
    if rest >= n0 * sum(w):
        return [n0] * len(w)

    def counts(r: float) -> list[int]:
        return [max(protected, min(n0, math.floor(n0 * r ** (i + 1) + 1e-9))) for i in range(len(w))]

    lo, hi = 0.0, 1.0  # the largest share per drop whose schedule stays within the target
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(a * b for a, b in zip(w, counts(mid))) <= rest else (lo, mid)
    base = counts(lo)
    exact = _exact_counts(base, w, rest, protected, n0, radius=max(w) + 2)
    if exact is not None:
        return exact
    left = rest - sum(a * b for a, b in zip(w, base))
    for i in reversed(range(len(w))):  # none exists: the closest total below
        while left >= w[i] and base[i] < (base[i - 1] if i else n0):
            base[i] += 1
            left -= w[i]
    return base


def _exact_counts(base: list[int], w: list[int], total: int, low: int, high: int, radius: int) -> list[int] | None:
    """Non-increasing counts in [low, high], each within `radius` of `base` (nearest first), with sum(w * counts)
    == total; None when there are none. Depth-first with the reachable range of the remaining stages as bound."""
    suffix = [sum(w[i:]) for i in range(len(w) + 1)]
    out: list[int] = []

    def search(i: int, prev: int, left: int) -> bool:
        if i == len(w):
            return left == 0
        values = range(max(low, base[i] - radius), min(prev, base[i] + radius) + 1)
        for v in sorted(values, key=lambda v: (abs(v - base[i]), v)):
            rest = left - w[i] * v
            if low * suffix[i + 1] <= rest <= v * suffix[i + 1]:
                out.append(v)
                if search(i + 1, v, rest):
                    return True
                out.pop()
        return False

    return out if search(0, high, total) else None



def _check_layers(name: str, layers: Any, allow_none: bool = False) -> None:
    if layers is None and allow_none:
        return
    if (
        not isinstance(layers, (list, tuple))
        or not layers
        or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers)
        or list(layers) != sorted(set(layers))
    ):
        raise PlanError(f"{name}: layers= must be a non-empty increasing list of layer indices >= 0, got {layers!r}")


def dual_attention_drop(
    probs: Tensor, row_ok: Tensor, visual: Tensor, protected: Tensor, global_thr: float, individual_thr: float
) -> Tensor:
    """MustDrop's dual-threshold rule.

    Args:
        probs: (B, H, R, L) attention probabilities of the text query rows over all current keys.
        row_ok: (B, R) bool, real text rows (others are padding and count for nothing).
        visual, protected: (B, L) bool.

    Returns:
        (B, L) bool, the visual tokens to drop.
    """
    a = probs.mean(1) * row_ok[..., None].float()  # (B, R, L)
    vis = visual.float()
    g = a.sum(1) * vis  # (B, L) global score
    i = a.amax(1) * vis  # (B, L) individual score
    total = g.sum(1, keepdim=True)
    return visual & ~protected & (g < global_thr * total) & (i < individual_thr)


def dual_attention_score(
    probs: Tensor, row_ok: Tensor, visual: Tensor, global_thr: float, individual_thr: float
) -> Tensor:
    """The budget form's rank: s = max(G / (global_thr * sum G), I / individual_thr), so s < 1 exactly where the
    threshold rule drops (a zero threshold makes its criterion decide alone). Shapes as `dual_attention_drop`;
    returns (B, L) fp32 (0 on non-visual tokens)."""
    a = probs.float().mean(1) * row_ok[..., None].float()
    vis = visual.float()
    g = a.sum(1) * vis
    i = a.amax(1) * vis
    tiny = torch.finfo(torch.float32).tiny
    g_term = g / (global_thr * g.sum(1, keepdim=True)).clamp(min=tiny)
    i_term = i / max(individual_thr, tiny)
    return torch.maximum(g_term, i_term) * vis


def _check_budget(name: str, tokens: Any, keep: Any) -> None:
    if tokens is not None and keep is not None:
        raise BudgetError(f"{name}: give either tokens= or keep=, not both")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0):
        raise BudgetError(f"{name}: tokens= must be a positive integer (visual tokens per layer), got {tokens!r}")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1):
        raise BudgetError(f"{name}: keep= must be a fraction in (0, 1], got {keep!r}")


@register_reducer
@dataclass
class MustDropPrefill(PrefillReducer):
    """MustDrop stage 2: drop visual tokens with low total AND low peak attention from the text queries, by the
    thresholds or to a budget (the visual tokens averaged over the decoder layers); see the module docstring."""

    name = "mustdrop-prefill"
    stage = Stage.PREFILL
    summary = "MustDrop: drop the visual tokens the text attends to least, after LLM layers 2/6/10/14 of 32"

    layers: list[int] | None = param(None, "decoder layers after which it drops",
                                     shown="2/6/10/14 of 32, scaled")
    global_thr: float = param(0.001, "drop a token whose total text attention is under this share of all visual "
                              "tokens' total...")
    individual_thr: float = param(0.001, "...and whose largest attention from one text token is under this")
    tokens: int | None = param(None, "budget form: visual tokens averaged over the decoder layers (replaces the "
                               "thresholds' cut)")
    keep: float | None = param(None, "budget form: that average as a fraction of the visual tokens entering the LLM")

    def validate(self) -> None:
        _check_layers(self.name, self.layers, allow_none=True)
        for key in ("global_thr", "individual_thr"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise PlanError(f"{self.name}: {key}= must be a number >= 0, got {v!r}")
        _check_budget(self.name, self.tokens, self.keep)

    @property
    def budgeted(self) -> bool:
        return self.tokens is not None or self.keep is not None

    def acts_after(self, num_layers: int) -> list[int]:
        if self.layers is None:
            return scaled_layers(num_layers)
        if self.layers[-1] > num_layers - 2:
            raise PlanError(
                f"{self.name}: layers={list(self.layers)} but the decoder has {num_layers} layers; pruning layers "
                f"must be in 0..{num_layers - 2} (leave layers= out for the release's layers scaled to the depth: "
                f"{scaled_layers(num_layers) if num_layers >= 2 else 'none'})"
            )
        return list(self.layers)

    def select(self, view: LayerView, contexts: Any) -> Tensor:
        keep = torch.ones_like(view.valid)
        if view.max_after == 0:  # no text after the image: nothing to score by
            return keep
        rows, row_ok = view.rows_of(view.after_visual, view.max_after)
        probs = view.attention(rows)
        if not self.budgeted:
            drop = dual_attention_drop(probs, row_ok, view.visual, view.protected, self.global_thr,
                                       self.individual_thr)
            return keep & ~drop
        score = dual_attention_score(probs, row_ok, view.visual, self.global_thr, self.individual_thr)
        counts = torch.tensor(self.stage_counts(view), device=score.device)  # (B,)
        key = score.masked_fill(~view.visual, float("-inf")).masked_fill(view.protected, float("inf"))
        order = torch.argsort(key, dim=1, descending=True, stable=True)
        ranks = torch.arange(key.shape[1], device=key.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(1, order, ranks)
        return ~view.visual | view.protected | (rank < counts[:, None])

    def target_total(self, n0: int, num_layers: int) -> int:
        """The budget as visual tokens summed over the decoder layers, for a sample with n0 visual tokens."""
        average = self.tokens if self.tokens is not None else float(self.keep) * n0  # type: ignore[arg-type]
        return math.floor(average * num_layers + 0.5)

    def stage_counts(self, view: LayerView) -> list[int]:
        """Per sample: the visual tokens to keep after `view.layer` (one host sync per pruning layer)."""
        layers = self.acts_after(view.num_layers)
        spans = layer_spans(layers, view.num_layers)
        stage = layers.index(view.layer)
        n0 = view.n_visual0.tolist()
        protected = (view.protected & view.visual).sum(1).tolist()
        return [budget_schedule(n, p, spans, self.target_total(n, view.num_layers))[stage]
                for n, p in zip(n0, protected)]


@register_reducer
@dataclass
class MustDropDecode(DecodeReducer):
    """MustDrop stage 3: cut the KV caches of the pruning span to the tokens that survived prefill."""

    name = "mustdrop-decode"
    stage = Stage.DECODE
    summary = "MustDrop: after prefill, cut the KV cache of the pruning span (2..14 of 32) to the survivors"

    layers: list[int] | None = param(None, "the pruning layers whose span (first..last) is cut",
                                     shown="the plan's PREFILL layers")

    def validate(self) -> None:
        _check_layers(self.name, self.layers, allow_none=True)

    def span(self, state: CacheState) -> list[int]:
        """The layers whose cache is cut."""
        layers = self.layers if self.layers is not None else state.prefill_layers
        if not layers:
            return []
        if layers[-1] >= state.num_layers:
            raise PlanError(
                f"{self.name}: layers={list(layers)} but the decoder has {state.num_layers} layers"
            )
        return list(range(layers[0], layers[-1] + 1))

    def cut(self, state: CacheState) -> dict[int, Tensor]:
        return {layer: state.survivors(layer) for layer in self.span(state)}


#: (global_thr, individual_thr) of the release's scripts for LLaVA-1.5-7B, by MustDrop's layer-averaged tokens
THRESHOLD_PRESETS = {192: (0.001, 0.001), 128: (0.0012, 0.001), 64: (0.011, 0.01)}


@register_reducer
@dataclass
class MustDrop(Reducer):
    """MustDrop, all three stages in one plan entry: expands to mustdrop-vision + mustdrop-prefill (+ decode).

    By thresholds (`preset=` or `global_thr=`/`individual_thr=`, as the release) or to a budget (`tokens=`/`keep=`:
    the visual tokens averaged over the decoder layers); see the module docstring.
    """

    name = "mustdrop"
    stage = Stage.ENCODER
    summary = "MustDrop (all stages): window merge + key set, dual-attention prefill dropping, KV cache cut"

    preset: int | None = param(None, "192, 128 or 64: the release's thresholds for LLaVA-1.5-7B for about that "
                               "many tokens per layer")
    window: int = param(3, "vision stage: window side of the merge")
    threshold: float = param(0.8, "vision stage: similarity a window needs to be merged")
    key_ratio: float = param(0.08, "vision stage: share of tokens kept as the never-dropped key set")
    layers: list[int] | None = param(None, "decoder layers after which tokens drop",
                                     shown="2/6/10/14 of 32, scaled")
    global_thr: float = param(0.001, "prefill: the total-attention threshold (see mustdrop-prefill)")
    individual_thr: float = param(0.001, "prefill: the peak-attention threshold (see mustdrop-prefill)")
    tokens: int | None = param(None, "budget form: visual tokens averaged over the decoder layers")
    keep: float | None = param(None, "budget form: that average as a fraction of the visual tokens entering the LLM")
    decode: bool = param(True, "also cut the KV cache of the pruning span after prefill (stage 3)")

    def validate(self) -> None:
        if self.preset is not None and self.preset not in THRESHOLD_PRESETS:
            raise PlanError(
                f"{self.name}: preset must be one of {sorted(THRESHOLD_PRESETS)} or None, got {self.preset!r}"
            )
        if self.preset is not None and (self.tokens is not None or self.keep is not None):
            raise BudgetError(f"{self.name}: give preset= (the release's thresholds) or a budget (tokens=/keep=), "
                              "not both")
        self.parts()  # each stage validates its own fields

    def parts(self) -> list[Reducer]:
        from ..merge.window import MustDropVision

        g, i = THRESHOLD_PRESETS[self.preset] if self.preset is not None else (self.global_thr, self.individual_thr)
        out: list[Reducer] = [
            MustDropVision(window=self.window, threshold=self.threshold, key_ratio=self.key_ratio),
            MustDropPrefill(layers=self._layers(), global_thr=g, individual_thr=i, tokens=self.tokens,
                            keep=self.keep),
        ]
        if self.decode:
            out.append(MustDropDecode(layers=self._layers()))
        return out

    def _layers(self) -> list[int] | None:
        return None if self.layers is None else list(self.layers)
