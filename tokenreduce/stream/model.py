"""`StreamModel`: the narrow view of a video LLM that a `StreamingSession` works through.

Everything model-specific comes from the model's adapter once, here, and nowhere else in the session:

- `spec`: the adapter's `VideoSpec` (frame size, normalisation, placeholders per video);
- `tower`: the vision tower as the core's layer-by-layer runner sees it (`VisionTower`);
- `frame_tokens(hidden, pixels)`: tower hidden states of F frames -> the LLM-space tokens of each frame, as
  `VisualTokens` (projector and the model's own pooling applied by the adapter), plus the frame's extra tokens
  (a per-frame CLS on Video-LLaVA) and the video's trailing extra tokens (LLaVA-OneVision's newline);
- `lm`, `head`, `embed`: the stock decoder (called with `past_key_values` and explicit `position_ids`), the output
  head and the input embeddings (`get_input_embeddings`);
- `rope`: the decoder's rotary inverse frequencies, when its RoPE is the plain (or linearly scaled) kind, so kept
  keys can be re-rotated to new positions.

Layout of one frame in the LLM sequence (`per_frame` slots, from the adapter's placeholder layout): its grid
tokens and in-frame extras at their slots; a video's trailing extras follow the last frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..encoder import TowerRun, VisionTower
from ..errors import UnsupportedModelError
from ..registry import adapter_for
from ..tokens import VisualTokens


@dataclass
class FrameTokens:
    """The LLM-space tokens of one frame.

    Attributes:
        tokens: the frame's grid tokens (P, D) with their origins (`position` = slot within the frame's block).
        extra: (E, D) in-frame extra tokens (a frame's CLS), kept iff a grid token of the frame survives.
        extra_slots: (E,) their slots within the frame's block.
    """

    tokens: VisualTokens
    extra: Tensor
    extra_slots: Tensor


class StreamModel:
    """The parts of a video LLM that a stream uses (see the module doc). One per session; holds no stream state."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.adapter = adapter_for(model)(model)
        if not hasattr(self.adapter, "video_spec"):
            raise UnsupportedModelError(f"{type(model).__name__} is not a video LLM: a stream needs a video adapter")
        self.spec = self.adapter.video_spec()
        self.per_frame = self.spec.tokens(2) - self.spec.tokens(1)
        self.trailer = self.spec.tokens(1) - self.per_frame
        probe = torch.zeros(1, 1, 3, self.spec.size, self.spec.size)
        vis = self.adapter.visual_inputs({"pixel_values_videos": probe})
        if vis is None or vis.modality != "video":
            raise UnsupportedModelError(f"{type(model).__name__}'s adapter does not read videos")
        self.tower: VisionTower = self.adapter.tower(vis)  # the video tower (Video-LLaVA has two)
        lay = vis.layouts[0]
        self.grid: tuple[int, int] = lay.grids[0]
        self._slots = lay.slots
        self.lm: nn.Module = self.adapter.language_model()
        self.head: nn.Module = model.get_output_embeddings()
        self.embed_tokens: nn.Module = model.get_input_embeddings()
        self.trailer_features: Tensor | None = None  # set on the first frame
        self.hidden_size = self.embed_tokens.weight.shape[1]

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[0] * self.grid[1]

    def embed(self, ids: Tensor) -> Tensor:
        """(L,) token ids -> (L, D) input embeddings."""
        return self.embed_tokens(ids)

    def encode_plain(self, pixels: Tensor) -> Tensor:
        """The stock tower on frames (F, 3, S, S): hidden states at its feature layers (F, prefix + T, Dv)."""
        tower = self.tower
        wanted = sorted(tower.feature_layers)
        hidden = tower.embed(pixels)
        feats = {0: hidden} if 0 in wanted else {}
        for i in range(wanted[-1]):
            hidden = tower.layers[i](hidden, None)
            if i + 1 in wanted:
                feats[i + 1] = hidden
        return torch.cat([feats[w] for w in tower.feature_layers], -1)

    def frame_tokens(self, hidden: Tensor, pixels: Tensor) -> list[FrameTokens]:
        """Tower hidden states (F, prefix + T, Dv) of F frames -> each frame's LLM tokens (see `FrameTokens`)."""
        f = hidden.shape[0]
        vis = self.adapter.visual_inputs({"pixel_values_videos": pixels[None]})
        lay = vis.layouts[0]
        n = self.tokens_per_frame
        items = list(lay.items)
        llm = VisualTokens.from_items([torch.zeros(n, 0)] * f, list(lay.grids), lay.slots.clone(), items)
        tower_batch = self.adapter.tower_tokens(vis, [llm])[0]
        prefix = self.tower.prefix
        feats = hidden[:, prefix:].reshape(-1, hidden.shape[-1])
        if feats.shape[0] != len(tower_batch):
            raise UnsupportedModelError(
                f"the tower gave {feats.shape[0]} tokens for {len(tower_batch)} grid tokens of {f} frames"
            )
        run = TowerRun(batch=[tower_batch.with_features(feats)], layers_run=self.tower.num_layers, seconds=0.0,
                       prefix=hidden[:, :prefix])
        out = self.adapter.finish_tokens(vis, run, [llm])[0]
        extra_slots = lay.extra_slots if lay.extra_slots is not None else torch.zeros(0, dtype=torch.long)
        extra_feats = lay.extra_features if lay.extra_features is not None else torch.zeros(0, out.features.shape[1])
        block = self.per_frame
        trailing = extra_slots >= f * block
        if bool(trailing.any()) and self.trailer_features is None:
            self.trailer_features = extra_feats[trailing].detach()
        frames = []
        for i in range(f):
            idx = torch.nonzero(out.item == i).flatten()
            tok = out.select(idx)
            tok = VisualTokens(tok.features, torch.zeros_like(tok.item), tok.row, tok.col, tok.position - i * block,
                               tok.size, torch.arange(len(idx)), (lay.grids[i],), (items[i],), dict(tok.scores))
            mine = (extra_slots >= i * block) & (extra_slots < (i + 1) * block)
            frames.append(FrameTokens(tok, extra_feats[mine], extra_slots[mine] - i * block))
        return frames

    def rope(self) -> Tensor:
        """The decoder's rotary inverse frequencies (R/2,), for re-rotating cached keys; refuses other RoPE kinds."""
        rot = getattr(self.lm, "rotary_emb", None)
        inv = getattr(rot, "inv_freq", None)
        kind = getattr(rot, "rope_type", "default")
        if inv is None or kind not in ("default", "linear") or float(getattr(rot, "attention_scaling", 1.0)) != 1.0:
            raise UnsupportedModelError(
                f"re-rotating cached keys needs the decoder's plain rotary embedding; {type(self.lm).__name__} has "
                f"{kind if inv is not None else 'none'}: use rerotate=False"
            )
        return inv
