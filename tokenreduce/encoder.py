"""The ENCODER stage: run the vision tower layer by layer so reducers can read it and shorten it.

Adapters describe their tower as a `VisionTower` (how to embed, the layers, where the CLS token is,
which hidden state is the visual feature); reducers never see a model family. `run_tower` then:

- runs the layers itself, on the same tensors the stock tower would use (so a plan that changes nothing
  gives bit-identical features), and stops after the last layer anybody needs (LLaVA's features come
  from the penultimate layer: the last layer is skipped unless a reducer asks for it);
- captures q/k only at the layers that `Probe`s name and stores CLS-attention rows, summed over heads, or
  the layer's keys (kind "keys") in `VisualTokens.scores` (any attention implementation: rows are recomputed
  from q/k, see attention.py);
- hands the patch tokens (hidden states) to `EncoderReducer`s after the layers they ask for, and runs the
  remaining layers on what they return: a genuinely shorter sequence per item (items that end up with
  different lengths are right-padded and the padding keys are masked);
- lets an `EncoderReducer` run chosen layers itself (`overrides`/`run_layer`: all items of the call, in
  order, with per-call `TowerState.scratch`), e.g. to recompute only some tokens of a frame.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from .attention import QKCapture, attention_probs
from .errors import UnsupportedModelError
from .plan import Context, Probe, Reducer, Stage
from .tokens import ItemInfo, VisualTokens

if TYPE_CHECKING:
    from .pipeline import StageRunner


@dataclass
class LayerBranches:
    """The two residual branches of a pre-LN transformer layer: ``x + attn(x, mask)``, then ``x + mlp(x)``.

    attn: (G, L, D) hidden, mask -> (G, L, D), the attention branch (its layer norm included, residual not added).
    mlp: (G, L, D) -> (G, L, D), the MLP branch (its layer norm included, residual not added).
    A reducer that runs a layer itself (`EncoderReducer.run_layer`) may reuse one branch's output for some
    tokens and recompute it for others; running both on everything equals the layer.
    """

    attn: Callable[[Tensor, Tensor | None], Tensor]
    mlp: Callable[[Tensor], Tensor]


@dataclass
class TowerState:
    """What a tower layer sees besides its (G, L, D) input, for one call (held by `run_tower`, no globals).

    G = tower rows (one per item: image, crop or frame), L = prefix + the longest row's tokens.

    Attributes:
        mask: (G, 1, 1, L) additive key mask once rows have different lengths, else None.
        valid: (G, L) bool, real tokens (prefix included); None while every row is full.
        rows, cols: (G, L) long, each token's row and column in its item's original grid (-1: prefix, padding).
        items: per tower row, (sample, index of the item within the sample, its `ItemInfo`), in row order;
            items of a sample are consecutive and in the sample's order (frames in time order).
        scratch: per-call storage for adapters and reducers (key it by the object that owns the entry); kept
            for the whole call, so a layer override can carry state (a cached reference frame) across layers.
        version: changes whenever the tokens change (an ENCODER reducer shortened or merged some), so a
            layer implementation can cache what it derives from `rows`/`cols` per version.
    """

    mask: Tensor | None
    valid: Tensor | None
    rows: Tensor
    cols: Tensor
    items: list[tuple[int, int, ItemInfo]]
    scratch: dict[Any, Any] = field(default_factory=dict)
    version: int = 0


@dataclass
class VisionTower:
    """What the core needs to run a vision tower layer by layer (filled by the adapter).

    Attributes:
        embed: pixel values -> (G, prefix + N, Dv), the input of layer 0 (one row per item, items of every
            sample in order; rows of different lengths are right-padded and `valid` says which are real).
        layers: the encoder layers.
        attention: layer -> its attention module (with q_proj/k_proj/head_dim, for `QKCapture`).
        prefix: tokens before the patch grid (1 for a CLS token, 0 for SigLIP).
        feature_layers: hidden-state indices whose patch tokens are the visual features (0 = embeddings,
            i = output of layer i - 1), concatenated along the feature axis when several.
        run_layer: how layer i runs: ``run_layer(i, hidden, state) -> hidden``. Default ``layers[i](hidden,
            state.mask)`` (CLIP/SigLIP). Towers with another convention (packed sequences, 2-D rotary,
            windows: Qwen2-VL) give their own; it must accept any subset of the tokens `state` describes.
        branches: layer -> its `LayerBranches`, for towers of pre-LN layers (lets a reducer run a layer
            itself for chosen items, e.g. reusing a reference frame's branch outputs); None if unknown.
        valid: (G, prefix + N) bool, real tokens of `embed`'s output when rows differ in length; None = all.
    """

    embed: Callable[[Tensor], Tensor]
    layers: Sequence[nn.Module]
    attention: Callable[[nn.Module], nn.Module]
    prefix: int
    feature_layers: list[int]
    run_layer: Callable[[int, Tensor, TowerState], Tensor] | None = None
    branches: Callable[[nn.Module], LayerBranches] | None = None
    valid: Tensor | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def key_layer(self, layer: int | None) -> int:
        """The layer whose keys a "keys" probe reads: None = the layer that takes the visual features as input
        (its keys are computed from them), else `layer` as in `resolve`."""
        if layer is not None:
            return self.resolve(layer)
        idx = max(self.feature_layers)
        if idx >= self.num_layers:
            raise UnsupportedModelError(
                "keys of the visual features: they come from the vision tower's last layer, and no layer computes "
                "keys from them"
            )
        return idx

    def resolve(self, layer: int | None) -> int:
        """A layer index in [0, num_layers): None = the feature layer, negative counts from the end."""
        n = self.num_layers
        if layer is None:
            return max(self.feature_layers) - 1
        idx = layer + n if layer < 0 else layer
        if not 0 <= idx < n:
            raise UnsupportedModelError(f"vision layer {layer} does not exist: the tower has {n} layers")
        return idx

    def run(self, i: int, hidden: Tensor, state: TowerState) -> Tensor:
        """Run layer `i` on `hidden` (G, L, D) by the tower's convention."""
        if self.run_layer is not None:
            return self.run_layer(i, hidden, state)
        return self.layers[i](hidden, state.mask)


@dataclass
class EncoderReducer(Reducer):
    """Base of reducers that act inside the vision tower.

    Two hooks, either or both:

    - `layers` says after which tower layers `reduce_layer` runs (indices as `VisionTower.resolve` takes
      them); there the tokens' features are the hidden states of the patch tokens (N, Dv) after that layer,
      probes of that layer are already in `scores`, and whatever it returns is what the next layers run on.
    - `overrides` names layers the reducer runs itself: `run_layer` then replaces the tower's own call for
      that layer (all rows at once; `state.items` says which row is which item, in order, and
      `state.scratch` keeps per-call state). Only one reducer may override a given layer.
    """

    stage: ClassVar[Stage] = Stage.ENCODER

    def layers(self, tower: VisionTower) -> list[int]:
        return []

    def reduce_layer(
        self, layer: int, tower: VisionTower, batch: list[VisualTokens], contexts: list[Context]
    ) -> list[VisualTokens]:
        raise NotImplementedError(f"{type(self).__name__} must implement reduce_layer")

    def overrides(self, tower: VisionTower) -> list[int]:
        """Tower layers this reducer runs itself (see `run_layer`)."""
        return []

    def run_layer(
        self, layer: int, tower: VisionTower, hidden: Tensor, state: TowerState, contexts: list[Context]
    ) -> Tensor:
        """Run tower layer `layer` on `hidden` (G, L, D) and return its output (G, L, D).

        `tower.run(layer, hidden, state)` is the stock computation; `tower.branches` (when not None) gives
        the layer's attention and MLP branches for a partial recomputation.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement run_layer for the layers it overrides")


@dataclass
class TowerRun:
    """Result of `run_tower`: per-sample tokens whose features are the visual features (N, Dv)."""

    batch: list[VisualTokens]
    layers_run: int
    seconds: float
    prefix: Tensor | None = None  # (G, prefix, Dv) the prefix tokens (CLS) at the feature layer


class _Layout:
    """Where each token of each sample sits in the tower batch: row (item) and column (after the prefix)."""

    def __init__(self, batch: list[VisualTokens], first_row: list[int]):
        rows, cols = [], []
        for vt, r0 in zip(batch, first_row):
            counts = vt.item_counts()
            starts = torch.cumsum(counts, 0) - counts
            rows.append(vt.item + r0)
            cols.append(torch.arange(len(vt), device=vt.item.device) - starts[vt.item])
        self.rows = torch.cat(rows)
        self.cols = torch.cat(cols)
        self.sizes = [len(v) for v in batch]
        self.lengths = torch.cat([v.item_counts() for v in batch])

    def gather(self, hidden: Tensor, prefix: int) -> list[Tensor]:
        return list(hidden[self.rows, prefix + self.cols].split(self.sizes))

    def grid(self, batch: list[VisualTokens], shape: tuple[int, int], prefix: int) -> tuple[Tensor, Tensor]:
        """(G, L) long grid rows and columns of every token in the tower batch (-1: prefix, padding)."""
        device = self.rows.device
        rows = torch.full(shape, -1, dtype=torch.long, device=device)
        cols = torch.full(shape, -1, dtype=torch.long, device=device)
        rows[self.rows, prefix + self.cols] = torch.cat([v.row for v in batch]).to(device)
        cols[self.rows, prefix + self.cols] = torch.cat([v.col for v in batch]).to(device)
        return rows, cols


def run_tower(
    tower: VisionTower,
    pixel_values: Tensor,
    batch: list[VisualTokens],
    reducers: list[EncoderReducer],
    probes: list[Probe],
    contexts: list[Context],
    runner: StageRunner | None = None,
) -> TowerRun:
    """Run the tower on `pixel_values` with `reducers` and `probes`; see the module docstring.

    Args:
        tower: the adapter's description of its vision tower.
        pixel_values: the tower's input (one item per row after `embed`), samples in order and items in
            order within a sample.
        batch: per sample, its original tokens (every patch of every item; features are ignored).
        reducers: ENCODER-stage reducers, in plan order.
        probes: signals to record into `scores`.
        contexts: per-sample contexts, passed to reducers.
        runner: times the reducers and records their token counts (`tokenreduce.pipeline.StageRunner`).
    """
    if runner is None:
        from .pipeline import StageRunner

        runner = StageRunner()
    t0 = time.perf_counter()
    reduce_before = runner.reduce_seconds()
    first_row, r = [], 0
    items: list[tuple[int, int, ItemInfo]] = []
    for b, vt in enumerate(batch):
        first_row.append(r)
        r += vt.num_items
        items += [(b, j, it) for j, it in enumerate(vt.items)]
    cls_probes = [p for p in probes if p.kind == "cls"]
    if cls_probes and tower.prefix == 0:
        raise UnsupportedModelError(
            f"{', '.join(p.name for p in cls_probes)} need the CLS token's attention, and this vision tower has none"
        )
    acts: dict[int, list[EncoderReducer]] = {}
    for red in reducers:
        for layer in red.layers(tower):
            acts.setdefault(tower.resolve(layer), []).append(red)
    override: dict[int, EncoderReducer] = {}
    for red in reducers:
        for layer in red.overrides(tower):
            i = tower.resolve(layer)
            if i in override:
                raise UnsupportedModelError(
                    f"{override[i].name} and {red.name} both run vision layer {i} themselves; only one may"
                )
            override[i] = red
    probe_at: dict[int, list[Probe]] = {}
    for p in probes:
        probe_at.setdefault(tower.key_layer(p.layer) if p.kind == "keys" else tower.resolve(p.layer), []).append(p)
    clash = sorted(set(override) & set(probe_at))
    if clash:
        raise UnsupportedModelError(
            f"{override[clash[0]].name} runs vision layer {clash[0]} itself, so the attention that "
            f"{', '.join(p.name for p in probe_at[clash[0]])} reads there is not computed"
        )
    feat_layers = sorted(tower.feature_layers)
    last = max([feat_layers[-1] - 1, *acts, *probe_at, *override])
    if acts and len(feat_layers) > 1 and min(acts) < feat_layers[-1] - 1 and min(acts) >= feat_layers[0] - 1:
        raise UnsupportedModelError(
            f"the visual features concatenate several vision layers {feat_layers}; tokens cannot be merged "
            "or dropped between them"
        )

    layout = _Layout(batch, first_row)
    hidden = tower.embed(pixel_values)
    if hidden.shape[0] != r:
        raise ValueError(f"run_tower: {hidden.shape[0]} tower inputs for {r} items")
    key_valid = tower.valid  # (G, L) bool, once items have different lengths
    rows, cols = layout.grid(batch, tuple(hidden.shape[:2]), tower.prefix)
    state = TowerState(mask=None if key_valid is None else _additive(key_valid, hidden.dtype), valid=key_valid,
                       rows=rows, cols=cols, items=items)
    feats: dict[int, list[Tensor]] = {}
    run = TowerRun(batch=batch, layers_run=last + 1, seconds=0.0)
    prefix: dict[int, Tensor] = {}
    if 0 in feat_layers:
        feats[0] = layout.gather(hidden, tower.prefix)
        prefix[0] = hidden[:, : tower.prefix]
    modules = {i: tower.attention(tower.layers[i]) for i in probe_at}
    with QKCapture(modules) as cap:
        for i in range(last + 1):
            if i in override:
                red = override[i]
                with runner.timed(f"reduce:{red.name}", contexts):
                    hidden = red.run_layer(i, tower, hidden, state, contexts)
            else:
                hidden = tower.run(i, hidden, state)
            if i in probe_at:
                names = [p.name for p in probe_at[i] if p.kind == "cls"]
                if names:
                    cls = attention_probs(cap.q[i][:, :, :1], cap.k[i], cap.scaling(i), mask=key_valid)
                    cls = cls.sum(1)[:, 0, tower.prefix :]  # (G, L - prefix)
                    vals = cls[layout.rows, layout.cols].float().split(layout.sizes)
                    batch = [v.with_scores(**dict.fromkeys(names, s)) for v, s in zip(batch, vals)]
                names = [p.name for p in probe_at[i] if p.kind == "keys"]
                if names:  # the layer's keys of the patch tokens, heads concatenated: (G, L - prefix, H * d)
                    keys = cap.k[i].transpose(1, 2).flatten(2)[:, tower.prefix :]
                    vals = keys[layout.rows, layout.cols].split(layout.sizes)
                    batch = [v.with_scores(**dict.fromkeys(names, s)) for v, s in zip(batch, vals)]
                cap.q.pop(i), cap.k.pop(i)
            if i in acts:
                cur = layout.gather(hidden, tower.prefix)
                batch = [v.with_features(f) for v, f in zip(batch, cur)]
                for red in acts[i]:
                    with runner.timed(f"reduce:{red.name}", contexts):
                        out = red.reduce_layer(i, tower, batch, contexts)
                    runner.check(red, out, batch)
                    batch = [v.select(torch.argsort(v.item, stable=True)) for v in out]
                    # counted like the LLM will see them: tokens with a placeholder (not anyres padding)
                    runner.record(red.name, [int((v.position >= 0).sum()) for v in batch], repeat=False)
                layout = _Layout(batch, first_row)
                hidden, key_valid = _rebuild(hidden, batch, layout, tower.prefix)
                state.mask = None if key_valid is None else _additive(key_valid, hidden.dtype)
                state.valid = key_valid
                state.rows, state.cols = layout.grid(batch, tuple(hidden.shape[:2]), tower.prefix)
                state.version += 1
            if i + 1 in feat_layers:
                feats[i + 1] = layout.gather(hidden, tower.prefix)
                prefix[i + 1] = hidden[:, : tower.prefix]
    per_layer = [feats[f] for f in tower.feature_layers]
    features = per_layer[0] if len(per_layer) == 1 else [torch.cat(fs, -1) for fs in zip(*per_layer)]
    runner.sync()
    run.batch = [v.with_features(f) for v, f in zip(batch, features)]
    run.prefix = torch.cat([prefix[f] for f in tower.feature_layers], -1)
    run.seconds = time.perf_counter() - t0 - (runner.reduce_seconds() - reduce_before)
    return run


def _rebuild(hidden: Tensor, batch: list[VisualTokens], layout: _Layout, prefix: int) -> tuple[Tensor, Tensor | None]:
    """The tower batch holding each item's current tokens after its prefix, right-padded; key validity."""
    g, _, d = hidden.shape
    lengths = layout.lengths
    width = prefix + int(lengths.max())
    out = hidden.new_zeros(g, width, d)
    out[:, :prefix] = hidden[:, :prefix]
    out[layout.rows, prefix + layout.cols] = torch.cat([v.features for v in batch]).to(hidden.dtype)
    if bool((lengths == lengths[0]).all()):
        return out, None
    valid = torch.arange(width, device=hidden.device)[None, :] < (prefix + lengths)[:, None]
    return out, valid


def _additive(valid: Tensor, dtype: torch.dtype) -> Tensor:
    """(G, L) bool key validity -> (G, 1, 1, L) additive mask (0 keep, dtype min drop)."""
    m = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
    return m.masked_fill(~valid, torch.finfo(dtype).min)[:, None, None, :]
