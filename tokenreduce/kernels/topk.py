"""Ragged top-k: the k best tokens of every segment (image, crop, frame) of a flat token list, in one call.

Reducers that keep the top tokens of each item (HiRED per partition, MustDrop's key set per item, STC's
pruner per frame) otherwise loop over items in Python with one `torch.topk` each. `segment_topk(scores,
segments, k)` does every segment at once and returns a keep mask, so kept tokens stay in their order.

Semantics, identical on both backends: within a segment, tokens rank by score (descending, or ascending with
``largest=False``), ties going to the lower index; NaN ranks last; a segment keeps min(k, its size) tokens.
The torch reference is two stable sorts (O(N log N), no loop over segments; one batched sort when the
segments are equal and in order, as frames are); the Triton kernel ranks each
token by counting the tokens of its segment that beat it (segments are small; no sort of the scores).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._backend import KernelError, check_tensor, jit, next_pow2, resolve

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


def segment_topk(
    scores: Tensor,
    segments: Tensor,
    k: Tensor | int,
    largest: bool = True,
    *,
    backend: str = "auto",
) -> Tensor:
    """(N,) bool: the top `k[s]` tokens of every segment s.

    Args:
        scores: (N,) float scores.
        segments: (N,) long segment of every token in [0, S) (any order; -1: never kept).
        k: (S,) long tokens to keep per segment, or one int for all.
        largest: keep the highest scores (else the lowest).
        backend: "auto", "torch" or "triton".
    """
    op = "segment_topk"
    check_tensor(op, "scores", scores, 1)
    n = scores.shape[0]
    if not isinstance(segments, Tensor) or segments.dtype != torch.long or tuple(segments.shape) != (n,):
        raise KernelError(f"{op}: segments must be a long tensor of shape {(n,)}")
    segments = segments.to(scores.device)
    if isinstance(k, int) and not isinstance(k, bool):
        if k < 0:
            raise KernelError(f"{op}: k must be >= 0, got {k}")
        num = int(segments.max()) + 1 if n else 0
        k = torch.full((max(num, 0),), k, dtype=torch.long, device=scores.device)
    elif not isinstance(k, Tensor) or k.dtype != torch.long or k.dim() != 1:
        raise KernelError(f"{op}: k must be an int or a 1-D long tensor (one count per segment)")
    k = k.to(scores.device)
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=scores.device)
    num = k.shape[0]
    # ranking key: higher is better; NaN always last
    s = scores.float() if largest else -scores.float()
    s = torch.nan_to_num(s, nan=float("-inf"))
    valid = (segments >= 0) & (segments < num)
    seg = torch.where(valid, segments, num)  # spare segment for tokens outside every segment
    kk = torch.cat([k, k.new_zeros(1)])
    if resolve(backend, op, scores) == "triton":
        return _topk_triton(s, seg, kk, num + 1)
    return _topk_torch(s, seg, kk, num + 1)


def _topk_torch(s: Tensor, seg: Tensor, k: Tensor, num: int) -> Tensor:
    counts = torch.bincount(seg, minlength=num)
    n = s.shape[0]
    if num > 1 and n % (num - 1) == 0 and bool((seg == torch.arange(num - 1, device=s.device).repeat_interleave(
            n // (num - 1))).all()):  # equal segments in order (frames of one grid): one batched sort
        per = n // (num - 1)
        order = torch.argsort(s.view(num - 1, per), dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(per, device=s.device).expand_as(order))
        return (rank < k[: num - 1, None]).flatten()
    by_score = torch.argsort(s, descending=True, stable=True)  # ties: lower index first
    order = by_score[torch.argsort(seg[by_score], stable=True)]  # grouped by segment, best first
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(s.shape[0], device=s.device) - start[seg[order]]
    keep = torch.zeros_like(seg, dtype=torch.bool)
    keep[order] = rank < k[seg[order]]
    return keep


if tl is not None:

    def _topk_kernel(s_ptr, perm_ptr, off_ptr, k_ptr, keep_ptr, BLOCK: tl.constexpr):
        """One program: BLOCK tokens of one segment; a token's rank is how many of its segment beat it."""
        seg = tl.program_id(0)
        pid = tl.program_id(1)
        start = tl.load(off_ptr + seg)
        end = tl.load(off_ptr + seg + 1)
        kseg = tl.load(k_ptr + seg)
        i = start + pid * BLOCK + tl.arange(0, BLOCK)
        ok = i < end
        si = tl.load(s_ptr + i, mask=ok, other=float("-inf"))
        rank = tl.zeros((BLOCK,), dtype=tl.int64)
        for j0 in range(start, end, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            sj = tl.load(s_ptr + j, mask=j < end, other=float("-inf"))
            beats = (sj[None, :] > si[:, None]) | ((sj[None, :] == si[:, None]) & (j[None, :] < i[:, None]))
            beats = beats & (j[None, :] < end)
            rank += tl.sum(beats.to(tl.int64), axis=1)
        tok = tl.load(perm_ptr + i, mask=ok, other=0)
        tl.store(keep_ptr + tok, (rank < kseg).to(tl.int8), mask=ok)


def _topk_triton(s: Tensor, seg: Tensor, k: Tensor, num: int) -> Tensor:
    perm = torch.argsort(seg, stable=True)  # segments contiguous, tokens in order within each
    offsets = torch.searchsorted(seg[perm], torch.arange(num + 1, device=s.device))
    longest = int((offsets[1:] - offsets[:-1]).max())
    keep = torch.zeros(s.shape[0], dtype=torch.int8, device=s.device)
    block = min(128, next_pow2(longest))
    jit(_topk_kernel)[(num, triton.cdiv(longest, block))](s[perm].contiguous(), perm, offsets, k, keep, BLOCK=block)
    return keep.bool()
