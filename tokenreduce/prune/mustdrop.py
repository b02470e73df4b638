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

Decode (`mustdrop-decode`), once after prefill: the caches of the layers from the first to the last pruning
layer (inclusive; 2..14 by default) are cut to the tokens that survived the final prefill drop; earlier layers
keep everything, later ones already hold exactly the survivors.

Differences from the released code, on purpose (spec section 3.8):
- per sample, any batch size (the release scores batch element 0 and applies it to the whole batch);
- surviving tokens keep their ORIGINAL positions and decoding continues from the original length, for every
  layer. The release compacts positions at each prefill stage and gives the new token the cache length of each
  layer, which makes relative positions inconsistent (even negative) in layers 2-14 after the cut;
- any depth (the release hard-codes 32 layers) and any attention implementation (q/k captured, sdpa kept).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import PlanError
from ..llm import CacheState, DecodeReducer, LayerView, PrefillReducer
from ..plan import Reducer, Stage
from ..registry import register_reducer

DEFAULT_LAYERS = (2, 6, 10, 14)


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


@register_reducer
@dataclass
class MustDropPrefill(PrefillReducer):
    """MustDrop stage 2: drop visual tokens with low total AND low peak attention from the text queries.

    Fields: layers (0-indexed decoder layers after which it acts), global_thr, individual_thr (see the module
    docstring for the presets).
    """

    name = "mustdrop-prefill"
    stage = Stage.PREFILL
    summary = "MustDrop: drop visual tokens with low total and low peak text attention at LLM layers 2/6/10/14"

    layers: list[int] = field(default_factory=lambda: list(DEFAULT_LAYERS))
    global_thr: float = 0.001
    individual_thr: float = 0.001

    def validate(self) -> None:
        _check_layers(self.name, self.layers)
        for key in ("global_thr", "individual_thr"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise PlanError(f"{self.name}: {key}= must be a number >= 0, got {v!r}")

    def acts_after(self, num_layers: int) -> list[int]:
        if self.layers[-1] > num_layers - 2:
            raise PlanError(
                f"{self.name}: layers={list(self.layers)} but the decoder has {num_layers} layers; pruning layers "
                f"must be in 0..{num_layers - 2} (e.g. layers=[1, 2] for a 4-layer model)"
            )
        return list(self.layers)

    def select(self, view: LayerView, contexts: Any) -> Tensor:
        keep = torch.ones_like(view.valid)
        if view.max_after == 0:
            return keep
        rows, row_ok = view.rows_of(view.after_visual, view.max_after)
        drop = dual_attention_drop(
            view.attention(rows), row_ok, view.visual, view.protected, self.global_thr, self.individual_thr
        )
        return keep & ~drop


@register_reducer
@dataclass
class MustDropDecode(DecodeReducer):
    """MustDrop stage 3: cut the KV caches of the pruning span to the tokens that survived prefill.

    Fields: layers (the prefill pruning layers; the span first..last is cut). None = the layers after which the
    plan's PREFILL reducers act.
    """

    name = "mustdrop-decode"
    stage = Stage.DECODE
    summary = "MustDrop: after prefill, cut the KV cache of layers 2..14 to the tokens that survived prefill"

    layers: list[int] | None = None

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

    Fields:
        preset: 192, 128 or 64: the release's thresholds for LLaVA-1.5-7B that give about that many visual
            tokens (layer-averaged); None uses global_thr / individual_thr.
        window, threshold, key_ratio: the vision stage (3x3 windows, 0.8 similarity, 8% key set).
        layers, global_thr, individual_thr: the prefill stage (layers 2/6/10/14 of a 32-layer decoder).
        decode: also cut the KV cache of the pruning span after prefill (stage 3).
    """

    name = "mustdrop"
    stage = Stage.ENCODER
    summary = "MustDrop (all stages): window merge + key set, dual-attention prefill dropping, KV cache cut"

    preset: int | None = None
    window: int = 3
    threshold: float = 0.8
    key_ratio: float = 0.08
    layers: list[int] = field(default_factory=lambda: list(DEFAULT_LAYERS))
    global_thr: float = 0.001
    individual_thr: float = 0.001
    decode: bool = True

    def validate(self) -> None:
        if self.preset is not None and self.preset not in THRESHOLD_PRESETS:
            raise PlanError(
                f"{self.name}: preset must be one of {sorted(THRESHOLD_PRESETS)} or None, got {self.preset!r}"
            )
        self.parts()  # each stage validates its own fields

    def parts(self) -> list[Reducer]:
        from ..merge.window import MustDropVision

        g, i = THRESHOLD_PRESETS[self.preset] if self.preset is not None else (self.global_thr, self.individual_thr)
        out: list[Reducer] = [
            MustDropVision(window=self.window, threshold=self.threshold, key_ratio=self.key_ratio),
            MustDropPrefill(layers=list(self.layers), global_thr=g, individual_thr=i),
        ]
        if self.decode:
            out.append(MustDropDecode(layers=list(self.layers)))
        return out
