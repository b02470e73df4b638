"""FLOPs of transformer forward passes, from widths and token counts (multiply-add = 2 FLOPs)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TransformerDims:
    """The widths that set a transformer's cost.

    `gated` MLPs (SwiGLU: gate, up, down) have three matrices; plain MLPs (CLIP, SigLIP) two.
    `vocab` > 0 adds one LM-head row (prefill computes logits of the last position only).
    """

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 0
    gated: bool = True

    def layer_flops(self, n: int) -> float:
        """FLOPs of one layer over `n` tokens attending to all `n` (QK^T and AV counted as full n x n)."""
        d = self.hidden
        dkv = self.kv_heads * (d // self.heads)
        proj = 2 * n * d * (d + 2 * dkv) + 2 * n * d * d
        mlp = 2 * n * d * self.intermediate * (3 if self.gated else 2)
        attn = 4 * n * n * d
        return float(proj + mlp + attn)

    def forward_flops(self, lengths: int | Sequence[int]) -> float:
        """FLOPs of a forward pass; `lengths` is one token count, or one per layer (in-LLM pruning)."""
        if isinstance(lengths, int):
            lengths = [lengths] * self.layers
        if len(lengths) != self.layers:
            raise ValueError(f"need one length per layer ({self.layers}), got {len(lengths)}")
        return sum(self.layer_flops(n) for n in lengths) + 2.0 * self.hidden * self.vocab
