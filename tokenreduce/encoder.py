"""The ENCODER stage: run the vision tower layer by layer so reducers can read it and shorten it.

Adapters describe their tower as a `VisionTower` (how to embed, the layers, where the CLS token is,
which hidden state is the visual feature); reducers never see a model family. `run_tower` then:

- runs the layers itself, on the same tensors the stock tower would use (so a plan that changes nothing
  gives bit-identical features), and stops after the last layer anybody needs (LLaVA's features come
  from the penultimate layer: the last layer is skipped unless a reducer asks for it);
- captures q/k only at the layers that `Probe`s name and stores CLS-attention rows, summed over heads,
  in `VisualTokens.scores` (any attention implementation: rows are recomputed from q/k, see attention.py);
- hands the patch tokens (hidden states) to `EncoderReducer`s after the layers they ask for, and runs the
  remaining layers on what they return: a genuinely shorter sequence per item (items that end up with
  different lengths are right-padded and the padding keys are masked).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from .attention import QKCapture, attention_probs
from .errors import UnsupportedModelError
from .plan import Context, Probe, Reducer, Stage
from .tokens import VisualTokens


@dataclass
class VisionTower:
    """What the core needs to run a vision tower layer by layer (filled by the adapter).

    Attributes:
        embed: pixel values (G, C, H, W) -> (G, prefix + N, Dv), the input of layer 0.
        layers: the encoder layers; each is called as ``layer(hidden, mask)``.
        attention: layer -> its attention module (with q_proj/k_proj/head_dim, for `QKCapture`).
        prefix: tokens before the patch grid (1 for a CLS token, 0 for SigLIP).
        feature_layers: hidden-state indices whose patch tokens are the visual features (0 = embeddings,
            i = output of layer i - 1), concatenated along the feature axis when several.
    """

    embed: Callable[[Tensor], Tensor]
    layers: Sequence[nn.Module]
    attention: Callable[[nn.Module], nn.Module]
    prefix: int
    feature_layers: list[int]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def resolve(self, layer: int | None) -> int:
        """A layer index in [0, num_layers): None = the feature layer, negative counts from the end."""
        n = self.num_layers
        if layer is None:
            return max(self.feature_layers) - 1
        idx = layer + n if layer < 0 else layer
        if not 0 <= idx < n:
            raise UnsupportedModelError(f"vision layer {layer} does not exist: the tower has {n} layers")
        return idx


@dataclass
class EncoderReducer(Reducer):
    """Base of reducers that act inside the vision tower.

    `layers` says after which tower layers `reduce_layer` runs (indices as `VisionTower.resolve` takes
    them); there the tokens' features are the hidden states of the patch tokens (N, Dv) after that
    layer, probes of that layer are already in `scores`, and whatever it returns is what the next layers
    run on.
    """

    stage: ClassVar[Stage] = Stage.ENCODER

    def layers(self, tower: VisionTower) -> list[int]:
        raise NotImplementedError(f"{type(self).__name__} must say after which vision layers it acts (layers)")

    def reduce_layer(
        self, layer: int, tower: VisionTower, batch: list[VisualTokens], contexts: list[Context]
    ) -> list[VisualTokens]:
        raise NotImplementedError(f"{type(self).__name__} must implement reduce_layer")


@dataclass
class TowerRun:
    """Result of `run_tower`: per-sample tokens whose features are the visual features (N, Dv)."""

    batch: list[VisualTokens]
    layers_run: int
    seconds: float
    prefix: Tensor | None = None  # (G, prefix, Dv) the prefix tokens (CLS) at the feature layer
    stages: list[tuple[str, list[int]]] = field(default_factory=list)
    times: dict[str, float] = field(default_factory=dict)


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


def run_tower(
    tower: VisionTower,
    pixel_values: Tensor,
    batch: list[VisualTokens],
    reducers: list[EncoderReducer],
    probes: list[Probe],
    contexts: list[Context],
    sync: Callable[[], None] = lambda: None,
) -> TowerRun:
    """Run the tower on `pixel_values` with `reducers` and `probes`; see the module docstring.

    Args:
        tower: the adapter's description of its vision tower.
        pixel_values: (G, C, H, W), one row per item, samples in order and items in order within a sample.
        batch: per sample, its original tokens (every patch of every item; features are ignored).
        reducers: ENCODER-stage reducers, in plan order.
        probes: signals to record into `scores`.
        contexts: per-sample contexts, passed to reducers.
    """
    t0 = time.perf_counter()
    first_row, r = [], 0
    for vt in batch:
        first_row.append(r)
        r += vt.num_items
    if r != pixel_values.shape[0]:
        raise ValueError(f"run_tower: {pixel_values.shape[0]} tower inputs for {r} items")
    if probes and tower.prefix == 0:
        raise UnsupportedModelError(
            f"{', '.join(p.name for p in probes)} need the CLS token's attention, and this vision tower has none"
        )
    acts: dict[int, list[EncoderReducer]] = {}
    for red in reducers:
        for layer in red.layers(tower):
            acts.setdefault(tower.resolve(layer), []).append(red)
    probe_at: dict[int, list[Probe]] = {}
    for p in probes:
        probe_at.setdefault(tower.resolve(p.layer), []).append(p)
    feat_layers = sorted(tower.feature_layers)
    last = max([feat_layers[-1] - 1, *acts, *probe_at])
    if acts and len(feat_layers) > 1 and min(acts) < feat_layers[-1] - 1 and min(acts) >= feat_layers[0] - 1:
        raise UnsupportedModelError(
            f"the visual features concatenate several vision layers {feat_layers}; tokens cannot be merged "
            "or dropped between them"
        )

    layout = _Layout(batch, first_row)
    hidden = tower.embed(pixel_values)
    mask: Tensor | None = None  # (G, 1, 1, L) additive, once items have different lengths
    key_valid: Tensor | None = None  # (G, L) bool
    feats: dict[int, list[Tensor]] = {}
    run = TowerRun(batch=batch, layers_run=last + 1, seconds=0.0)
    prefix: dict[int, Tensor] = {}
    if 0 in feat_layers:
        feats[0] = layout.gather(hidden, tower.prefix)
        prefix[0] = hidden[:, : tower.prefix]
    modules = {i: tower.attention(tower.layers[i]) for i in probe_at}
    with QKCapture(modules) as cap:
        for i in range(last + 1):
            hidden = tower.layers[i](hidden, mask)
            if i in probe_at:
                cls = attention_probs(cap.q[i][:, :, :1], cap.k[i], cap.scaling(i), mask=key_valid)
                cls = cls.sum(1)[:, 0, tower.prefix :]  # (G, L - prefix)
                cap.q.pop(i), cap.k.pop(i)
                vals = cls[layout.rows, layout.cols].float().split(layout.sizes)
                names = [p.name for p in probe_at[i]]
                batch = [v.with_scores(**dict.fromkeys(names, s)) for v, s in zip(batch, vals)]
            if i in acts:
                cur = layout.gather(hidden, tower.prefix)
                batch = [v.with_features(f) for v, f in zip(batch, cur)]
                for red in acts[i]:
                    sync()
                    t1 = time.perf_counter()
                    out = red.reduce_layer(i, tower, batch, contexts)
                    sync()
                    run.times[f"reduce:{red.name}"] = run.times.get(f"reduce:{red.name}", 0.0) + (
                        time.perf_counter() - t1
                    )
                    if len(out) != len(batch):
                        raise RuntimeError(f"{red.name} returned {len(out)} samples for a batch of {len(batch)}")
                    batch = [v.select(torch.argsort(v.item, stable=True)) for v in out]
                    # counted like the LLM will see them: tokens with a placeholder (not anyres padding)
                    counts = [int((v.position >= 0).sum()) for v in batch]
                    if (red.name, counts) not in run.stages[-1:]:
                        run.stages.append((red.name, counts))
                layout = _Layout(batch, first_row)
                hidden, key_valid = _rebuild(hidden, batch, layout, tower.prefix)
                mask = None if key_valid is None else _additive(key_valid, hidden.dtype)
            if i + 1 in feat_layers:
                feats[i + 1] = layout.gather(hidden, tower.prefix)
                prefix[i + 1] = hidden[:, : tower.prefix]
    per_layer = [feats[f] for f in tower.feature_layers]
    features = per_layer[0] if len(per_layer) == 1 else [torch.cat(fs, -1) for fs in zip(*per_layer)]
    sync()
    run.batch = [v.with_features(f) for v, f in zip(batch, features)]
    run.prefix = torch.cat([prefix[f] for f in tower.feature_layers], -1)
    run.seconds = time.perf_counter() - t0 - sum(run.times.values())
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
