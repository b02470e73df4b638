"""STC-Cacher: recompute only the tokens that changed since a reference frame, inside the vision encoder (STC,
arXiv 2512.00891; spec: shared/specs/video-reducers.md section 2.3).

Every `interval`-th frame of a stream is a reference frame, encoded fully; each layer keeps that frame's keys K,
values V, attention-branch output A (after out_proj) and MLP-branch output M. Every other frame runs each pre-LN
layer selectively (`selective_layer`), with x (F, T, C) the layer input:

1. LN1 for all tokens, fresh keys K for all tokens;
2. per token, cosine between its key and the reference frame's key at the same position; the U = max(1, int(T r))
   tokens with the lowest similarity are selected, per frame and per layer;
3. Q and V only for the selected tokens; V = the reference's values with the selected rows replaced;
4. attention of the selected queries over all (fresh) keys and that V, then out_proj; A = the reference's A with
   the selected rows replaced; h = x + A (the residual is the current frame's own);
5. M = the reference's M with the selected rows replaced by MLP(LN2(h)) of the selected tokens; output h + M.

A token never selected is its own input plus the reference frame's branch outputs, layer after layer; selection
is redone in every layer on that layer's keys. With r = 1 every token is recomputed and the layer equals the
stock layer (a test); with `interval=1` every frame is a reference frame.

The layer must be a transformers CLIP/SigLIP-style pre-LN encoder layer (`layer_norm1`, `self_attn.{q,k,v,out}_proj`
with `num_heads`, `head_dim`, `scale`, `layer_norm2`, `mlp`), run without an attention mask.

Differences from the official code (spec 2.11): the references live in a `CacherState` per stream, not on the
shared layers, so several streams (and offline samples) never mix; the frame counter belongs to the stream and
keeps counting across questions (the release restarts it per question, so the first frame after a question is
always a reference; `faithful=True` does that in a `StreamingSession`); batched calls are handled frame by frame
in stream order (the release silently disables itself on batched tower calls); no process-group calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..encoder import EncoderReducer, TowerState, VisionTower
from ..errors import PlanError, UnsupportedModelError
from ..plan import Context, param
from ..registry import register_reducer

METRICS = ("cosine", "l2", "dot")
_LAYER_PARTS = ("layer_norm1", "self_attn", "layer_norm2", "mlp")
_ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads", "head_dim", "scale")


@dataclass
class LayerParts:
    """One layer's quantities for F frames, each (F, T, C): keys, values, attention-branch and MLP-branch outputs."""

    k: Tensor
    v: Tensor
    a: Tensor
    m: Tensor

    def take(self, index: Tensor) -> LayerParts:
        """The frames at `index` (F',)."""
        return LayerParts(self.k[index], self.v[index], self.a[index], self.m[index])


def check_layer(layer: nn.Module) -> None:
    """Raise `UnsupportedModelError` unless `layer` is a CLIP/SigLIP-style pre-LN encoder layer."""
    missing = [n for n in _LAYER_PARTS if not hasattr(layer, n)]
    attn = getattr(layer, "self_attn", None)
    if attn is not None:
        missing += [f"self_attn.{n}" for n in _ATTN_PARTS if not hasattr(attn, n)]
    if missing:
        raise UnsupportedModelError(
            f"stc-cache runs CLIP/SigLIP-style pre-LN vision layers; {type(layer).__name__} has no "
            f"{', '.join(missing)}"
        )


def _attend(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Multi-head attention of queries q (F, U, C) over keys/values (F, T, C), no mask -> (F, U, C)."""
    f, u, c = q.shape
    h, d = attn.num_heads, attn.head_dim
    qh = q.view(f, u, h, d).transpose(1, 2)
    kh = k.view(f, -1, h, d).transpose(1, 2)
    vh = v.view(f, -1, h, d).transpose(1, 2)
    o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, scale=attn.scale)
    return o.transpose(1, 2).reshape(f, u, c)


def full_layer(layer: nn.Module, x: Tensor) -> tuple[Tensor, LayerParts]:
    """The stock pre-LN layer on x (F, T, C), computed so that its parts are kept: (output (F, T, C), K/V/A/M)."""
    attn = layer.self_attn
    h1 = layer.layer_norm1(x)
    k, v = attn.k_proj(h1), attn.v_proj(h1)
    a = attn.out_proj(_attend(attn, attn.q_proj(h1), k, v))
    h = x + a
    m = layer.mlp(layer.layer_norm2(h))
    return h + m, LayerParts(k, v, a, m)


def key_similarity(k: Tensor, k_ref: Tensor, metric: str = "cosine") -> Tensor:
    """Per-token similarity (F, T) of keys k (F, T, C) to the reference keys at the same positions."""
    if metric == "cosine":
        return torch.nn.functional.cosine_similarity(k.float(), k_ref.float(), dim=-1, eps=1e-8)
    if metric == "l2":
        return -(k.float() - k_ref.float()).norm(dim=-1)
    if metric == "dot":
        return (k.float() * k_ref.float()).sum(-1)
    raise PlanError(f"stc-cache: metric must be one of {', '.join(METRICS)}, got {metric!r}")


def recompute_count(tokens: int, ratio: float) -> int:
    """U = max(1, int(T * r)): tokens recomputed per frame and layer."""
    return min(tokens, max(1, int(tokens * ratio)))


def selective_layer(layer: nn.Module, x: Tensor, ref: LayerParts, ratio: float, metric: str = "cosine"
                    ) -> tuple[Tensor, Tensor]:
    """The layer on x (F, T, C) recomputing only the U tokens per frame whose keys changed most vs `ref` (each
    (F, T, C): every frame's reference); see the module doc. Returns (output (F, T, C), selected indices (F, U))."""
    attn = layer.self_attn
    f, t, c = x.shape
    h1 = layer.layer_norm1(x)
    k = attn.k_proj(h1)
    sim = key_similarity(k, ref.k, metric)
    sel = torch.argsort(sim, dim=1, stable=True)[:, : recompute_count(t, ratio)]  # lowest similarity first
    idx = sel[..., None].expand(-1, -1, c)
    hs = h1.gather(1, idx)
    v = ref.v.scatter(1, idx, attn.v_proj(hs))
    a = ref.a.scatter(1, idx, attn.out_proj(_attend(attn, attn.q_proj(hs), k, v)))
    h = x + a
    m = ref.m.scatter(1, idx, layer.mlp(layer.layer_norm2(h.gather(1, idx))))
    return h + m, sel


def cached_layer(layer: nn.Module, x: Tensor, is_ref: Tensor, prev: LayerParts | None, ratio: float,
                 metric: str = "cosine") -> tuple[Tensor, LayerParts | None, Tensor | None]:
    """One layer over F consecutive frames of one stream, x (F, T, C).

    Reference frames (`is_ref` (F,) bool) run fully; every other frame runs `selective_layer` against the latest
    reference before it: in this call, or `prev` (the stream's stored reference, (1, T, C) parts). Returns the
    output (F, T, C), the parts of the last reference frame (1, T, C) to store (or `prev` if none), and the
    selected indices of the selective frames (F_sel, U) or None.
    """
    f = x.shape[0]
    if f and not bool(is_ref[0]) and prev is None:
        raise RuntimeError("stc-cache: the first frame of a stream must be a reference frame")
    out = torch.empty_like(x)
    refs = torch.nonzero(is_ref).flatten()
    parts = None
    if refs.numel():
        out[refs], parts = full_layer(layer, x[refs])
    sel_frames = torch.nonzero(~is_ref).flatten()
    chosen = None
    if sel_frames.numel():
        # the latest reference at or before each frame: -1 means the stored one
        last = torch.cummax(torch.where(is_ref, torch.arange(f, device=x.device), -1), 0).values[sel_frames]
        stored = [p for p in (prev, parts) if p is not None]
        pool = stored[0] if len(stored) == 1 else LayerParts(*(torch.cat(t) for t in zip(
            *((p.k, p.v, p.a, p.m) for p in stored))))
        # index into pool: stored reference at 0 (when there is one), then this call's references in order
        rank = torch.searchsorted(refs, last) + (0 if prev is None else 1)
        rank = torch.where(last < 0, 0, rank)
        out[sel_frames], chosen = selective_layer(layer, x[sel_frames], pool.take(rank), ratio, metric)
    new = prev if parts is None else parts.take(torch.tensor([refs.numel() - 1], device=x.device))
    return out, new, chosen


@dataclass
class CacherState:
    """The cacher's per-stream state: the reference frame's parts per layer and the frame counter.

    Attributes:
        refs: per tower layer, the reference frame's `LayerParts` (1, T, C), or None before the first frame.
        frames: frames encoded so far (decides which frames are references).
        recomputed: per layer, how many tokens the latest selective frame recomputed (for reports).
    """

    refs: dict[int, LayerParts] = field(default_factory=dict)
    frames: int = 0
    recomputed: dict[int, int] = field(default_factory=dict)

    def reset(self) -> None:
        self.refs.clear()
        self.frames = 0
        self.recomputed.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for p in self.refs.values() for t in (p.k, p.v, p.a, p.m))


@register_reducer
@dataclass
class STCCache(EncoderReducer):
    """STC-Cacher: a reference frame every `interval` frames; in between, each vision layer recomputes only the
    `ratio` of tokens whose keys changed most and reuses the reference's values and branch outputs for the rest.

    Fields:
        ratio: share of tokens recomputed per layer on non-reference frames (r, 0.25 in the paper); 1.0 recomputes
            everything (equals the full encoder).
        interval: a reference frame every `interval` frames (N, 2 in the paper; 1 = every frame).
        metric: how keys are compared with the reference's: "cosine" (paper), "l2" or "dot".
        faithful: in a `StreamingSession`, restart the reference cycle after every question, as the release's
            streaming loop does (the first frame after a question is a reference frame).
    """

    name: ClassVar[str] = "stc-cache"
    summary: ClassVar[str] = "STC-Cacher: recompute only the tokens whose keys changed vs a periodic reference frame"

    ratio: float = param(0.25, "share of tokens each vision layer recomputes on non-reference frames (1: all)")
    interval: int = param(2, "a reference frame, encoded fully, every this many frames (1: every frame)")
    metric: str = param("cosine", "how keys are compared with the reference's: 'cosine', 'l2' or 'dot'")
    faithful: bool = param(False, "in a stream, restart the reference cycle after every question (the release)")

    def validate(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio <= 1:
            raise PlanError(f"stc-cache: ratio must be in (0, 1], got {self.ratio!r}")
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise PlanError(f"stc-cache: interval must be a positive integer, got {self.interval!r}")
        if self.metric not in METRICS:
            raise PlanError(f"stc-cache: metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if not isinstance(self.faithful, bool):
            raise PlanError(f"stc-cache: faithful must be true or false, got {self.faithful!r}")

    # -- as a plan stage: the tower runner lets it run every layer itself ------------------------------------
    def layers(self, tower: VisionTower) -> list[int]:
        return []  # it never changes the tokens, so it acts after no layer

    def overrides(self, tower: VisionTower) -> list[int]:
        for layer in tower.layers:
            check_layer(layer)
        return list(range(tower.num_layers))

    def run_layer(self, layer: int, tower: VisionTower, hidden: Tensor, state: TowerState,
                  contexts: list[Context]) -> Tensor:
        """Tower layer `layer` over every sample's items in order (each sample's items are one stream's frames,
        the first a reference): hidden (G, L, Dv) -> (G, L, Dv)."""
        if state.mask is not None:
            raise UnsupportedModelError("stc-cache needs every frame at full length (no padding mask in the tower)")
        samples = torch.tensor([b for b, _, _ in state.items])
        out = []
        for b in torch.unique_consecutive(samples).tolist():
            rows = torch.nonzero(samples == b).flatten().to(hidden.device)
            is_ref = torch.arange(rows.numel(), device=hidden.device) % self.interval == 0
            o, _, _ = cached_layer(tower.layers[layer], hidden[rows], is_ref, None, self.ratio, self.metric)
            out.append(o)
        return torch.cat(out)

    # -- in a stream -----------------------------------------------------------------------------------------
    def encode(self, tower: VisionTower, pixel_values: Tensor, state: CacherState) -> tuple[Tensor, Tensor]:
        """Encode F consecutive frames (F, C, H, W) of one stream, updating `state`.

        Returns the hidden states at the tower's feature layers (F, prefix + T, Dv) (several layers concatenated
        on the feature axis) and which frames were reference frames (F,) bool.
        """
        f = pixel_values.shape[0]
        is_ref = (torch.arange(f) + state.frames) % self.interval == 0
        hidden = tower.embed(pixel_values)
        is_ref = is_ref.to(hidden.device)
        wanted = sorted(tower.feature_layers)
        feats = {0: hidden} if 0 in wanted else {}
        for i in range(wanted[-1]):
            layer = tower.layers[i]
            check_layer(layer)
            hidden, state.refs[i], chosen = cached_layer(layer, hidden, is_ref, state.refs.get(i), self.ratio,
                                                         self.metric)
            if chosen is not None:
                state.recomputed[i] = chosen.shape[1]
            if i + 1 in wanted:
                feats[i + 1] = hidden
        state.frames += f
        return torch.cat([feats[w] for w in tower.feature_layers], -1), is_ref
