"""Attention rows without `output_attentions`: capture q/k, compute only the rows a reducer needs.

Reducers that score tokens by attention (HiRED's CLS row, MustDrop's text-query rows, AIM's PageRank)
must work under `sdpa`, `eager` and flash attention alike, and must not force the whole model onto the
eager path. `QKCapture` hooks the query/key projections of the attention modules it is given (only
those, only while asked) and `attention_probs` recomputes softmax rows from them in fp32 with the
module's own scaling, head layout, optional rotary embedding, GQA grouping and mask.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def attention_probs(
    q: Tensor,
    k: Tensor,
    scaling: float,
    rows: Tensor | slice | None = None,
    mask: Tensor | None = None,
    rope: tuple[Tensor, Tensor] | None = None,
    causal: bool = False,
) -> Tensor:
    """Softmax attention probabilities of selected query rows, in fp32.

    Args:
        q: (B, H, L, d) queries (before RoPE if `rope` is given).
        k: (B, H_kv, N, d) keys (before RoPE if `rope` is given); H must be a multiple of H_kv.
        scaling: the module's score scale (usually d ** -0.5).
        rows: which query positions to score (index tensor or slice); None = all.
        mask: (B, 1 or H, L, N) additive float mask or (B, N) key mask (1 keep, 0 drop), optional.
        rope: (cos, sin), each (B, L, d), applied to q and k (Llama-style rotate_half).
        causal: mask keys after each query (query i sees keys <= i + N - L).

    Returns:
        (B, H, R, N) fp32 probabilities; rows sum to 1.
    """
    q, k = q.float(), k.float()
    b, h, length, _ = q.shape
    n = k.shape[2]
    if rope is not None:
        cos, sin = (t.float().unsqueeze(1) for t in rope)
        q = q * cos[:, :, -length:] + rotate_half(q) * sin[:, :, -length:]
        k = k * cos[:, :, :n] + rotate_half(k) * sin[:, :, :n]
    if k.shape[1] != h:
        k = k.repeat_interleave(h // k.shape[1], dim=1)
    query_pos = torch.arange(length, device=q.device)
    if rows is not None:
        q = q[:, :, rows]
        query_pos = query_pos[rows]
    scores = (q @ k.transpose(-1, -2)) * scaling  # (B, H, R, N)
    if mask is not None:
        if mask.dim() == 2:  # key padding mask
            scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
        else:
            m = mask.float()
            scores = scores + (m[:, :, rows] if rows is not None else m)
    if causal:
        key_pos = torch.arange(n, device=q.device)
        scores = scores.masked_fill(key_pos[None, :] > (query_pos[:, None] + n - length), float("-inf"))
    return torch.softmax(scores, dim=-1)


class QKCapture:
    """Capture the (B, H, L, d) queries and keys of chosen attention modules during a forward pass.

    Each module needs `q_proj`, `k_proj` and `head_dim` (CLIP, SigLIP, Llama, Qwen2 all have them);
    `scale`/`scaling` gives the score scale. Hooks are in place only inside the `with` block, so
    the unreduced path pays nothing.

        with QKCapture({23: clip.encoder.layers[23].self_attn}) as cap:
            clip(pixel_values)
        cls_row = cap.probs(23, rows=slice(0, 1))   # (B, H, 1, N)
    """

    def __init__(self, modules: dict[Any, nn.Module]):
        for key, m in modules.items():
            for attr in ("q_proj", "k_proj", "head_dim"):
                if not hasattr(m, attr):
                    raise TypeError(f"attention module {key!r} ({type(m).__name__}) has no {attr}")
        self.modules = modules
        self.q: dict[Any, Tensor] = {}
        self.k: dict[Any, Tensor] = {}
        self._hooks: list[Any] = []

    def _hook(self, key: Any, store: dict[Any, Tensor], head_dim: int):
        def fn(module, args, output):
            store[key] = output.view(*output.shape[:-1], -1, head_dim).transpose(1, 2)

        return fn

    def __enter__(self) -> QKCapture:
        for key, m in self.modules.items():
            self._hooks.append(m.q_proj.register_forward_hook(self._hook(key, self.q, m.head_dim)))
            self._hooks.append(m.k_proj.register_forward_hook(self._hook(key, self.k, m.head_dim)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def scaling(self, key: Any) -> float:
        m = self.modules[key]
        return float(getattr(m, "scaling", None) or getattr(m, "scale", None) or m.head_dim**-0.5)

    def probs(self, key: Any, rows: Tensor | slice | None = None, **kwargs) -> Tensor:
        """(B, H, R, N) fp32 attention probabilities of `rows` at the captured module `key`."""
        if key not in self.q:
            raise RuntimeError(f"nothing captured for {key!r}: run the forward pass inside the with-block")
        return attention_probs(self.q[key], self.k[key], self.scaling(key), rows=rows, **kwargs)
