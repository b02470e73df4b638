"""Windowed similarity on a token grid, and the thresholded window merge (MustDrop's vision stage).

`window_similarity(x, window, stride)` scores every `window` x `window` window of each (h, w) token grid,
placed every `stride` cells (stride = window: non-overlapping, MustDrop's 3x3; stride 1: every neighbourhood),
by the mean cosine similarity over its ordered pairs of distinct tokens:

    sim = (|sum_a u_a|^2 - sum_a |u_a|^2) / (n (n - 1)),   u_a = x_a / max(|x_a|, eps), n = window^2.

`window_merge(x, window, threshold, valid)` merges every full non-overlapping window whose similarity reaches
`threshold` (and whose tokens are all `valid`) into one token (the mean of its members, size-weighted if
asked); windows cut by the grid's edge are left alone. Groups are numbered in raster order of their first
member, so merged tokens keep the grid's spatial order.

The torch reference sums the unit vectors with `avg_pool2d` (memory O(input), no loop over windows); the
Triton kernel builds each window's n x n Gram matrix in one pass over the features (the norms are its
diagonal), so nothing but the output is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._backend import KernelError, check_mask, check_tensor, jit, next_pow2, resolve
from .match import EPS
from .merge import scatter_mean

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


def _check_window(op: str, window: object, stride: object, h: int, w: int) -> None:
    for name, v in (("window", window), ("stride", stride)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise KernelError(f"{op}: {name} must be a positive integer, got {v!r}")
    if window < 2:  # type: ignore[operator]
        raise KernelError(f"{op}: window must be >= 2 (a window of one token has no pairs), got {window}")


def window_similarity(x: Tensor, window: int = 3, stride: int | None = None, *, backend: str = "auto") -> Tensor:
    """Mean pairwise cosine similarity of every window of a token grid.

    Args:
        x: (G, h, w, D) token grids (any float dtype; computed in fp32).
        window: window side k (>= 2).
        stride: cells between windows (default `window`: non-overlapping).
        backend: "auto", "torch" or "triton".

    Returns:
        (G, hh, ww) fp32 in [-1, 1], hh = (h - k) // stride + 1 (0 when the grid is smaller than a window).
    """
    op = "window_similarity"
    check_tensor(op, "x", x, 4)
    stride = window if stride is None else stride
    g, h, w, d = x.shape
    _check_window(op, window, stride, h, w)
    hh = (h - window) // stride + 1 if h >= window else 0
    ww = (w - window) // stride + 1 if w >= window else 0
    if g == 0 or hh == 0 or ww == 0:
        return torch.zeros(g, hh, ww, device=x.device)
    if resolve(backend, op, x) == "triton":
        return _window_triton(x, window, stride, hh, ww)
    return _window_torch(x, window, stride)


def _window_torch(x: Tensor, k: int, stride: int) -> Tensor:
    xf = x.float()
    norm = xf.norm(dim=-1, keepdim=True)
    u = xf / norm.clamp_min(EPS)
    n = k * k
    total = F.avg_pool2d(u.permute(0, 3, 1, 2), k, stride).mul_(n).pow_(2).sum(1)  # |sum u|^2, (G, hh, ww)
    own = F.avg_pool2d((norm / norm.clamp_min(EPS)).pow(2).permute(0, 3, 1, 2), k, stride).mul_(n)[:, 0]
    return (total - own) / (n * (n - 1))


if tl is not None:

    def _window_kernel(x_ptr, out_ptr, H, W, D, HH, WW, sxg, sxh, sxw, sxd,
                       K: tl.constexpr, STRIDE: tl.constexpr, KK: tl.constexpr, BD: tl.constexpr):
        """One program: one window's Gram matrix over the features, then its mean off-diagonal cosine."""
        pid = tl.program_id(0)
        g = pid // (HH * WW)
        rem = pid % (HH * WW)
        i = rem // WW
        j = rem % WW
        m = tl.arange(0, KK)
        member = m < K * K
        r = i * STRIDE + m // K
        c = j * STRIDE + m % K
        base = x_ptr + g * sxg + r * sxh + c * sxw
        gram = tl.zeros((KK, KK), dtype=tl.float32)
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD)
            t = tl.load(base[:, None] + dd[None, :] * sxd, mask=member[:, None] & (dd[None, :] < D), other=0.0)
            t = t.to(tl.float32)
            gram = tl.dot(t, tl.trans(t), gram, input_precision="ieee")
        eye = m[:, None] == m[None, :]
        diag = tl.sum(tl.where(eye, gram, 0.0), axis=1)
        nrm = tl.maximum(tl.sqrt(diag), 1e-12)
        cos = gram / (nrm[:, None] * nrm[None, :])
        total = tl.sum(tl.sum(cos, axis=1), axis=0)
        own = tl.sum(diag / (nrm * nrm), axis=0)
        n = K * K
        tl.store(out_ptr + pid, (total - own) / (n * (n - 1)))


def _window_triton(x: Tensor, k: int, stride: int, hh: int, ww: int) -> Tensor:
    g, h, w, d = x.shape
    out = torch.empty(g, hh, ww, dtype=torch.float32, device=x.device)
    bd = min(64, next_pow2(d))
    jit(_window_kernel)[(g * hh * ww,)](x, out, h, w, d, hh, ww, *x.stride(), K=k, STRIDE=stride,
                                        KK=next_pow2(k * k), BD=bd)
    return out


@dataclass
class WindowMerge:
    """Result of `window_merge` over G grids of h x w tokens (M merged tokens in all).

    Attributes:
        features: (M, D) merged tokens, grid by grid, each grid's tokens in raster order of their first member.
        size: (M,) fp32 summed sizes of each merged token's members.
        assign: (G * h * w,) long, the merged token (in [0, M)) of every input token, grids in order.
        counts: (G,) long, merged tokens per grid.
        similarity: (G, h // k, w // k) fp32 window similarities.
        merged: (G, h // k, w // k) bool, the windows that were merged.
    """

    features: Tensor
    size: Tensor
    assign: Tensor
    counts: Tensor
    similarity: Tensor
    merged: Tensor


def window_merge(
    x: Tensor,
    window: int = 3,
    threshold: float = 0.8,
    valid: Tensor | None = None,
    size: Tensor | None = None,
    weighted: bool = True,
    *,
    backend: str = "auto",
) -> WindowMerge:
    """Merge the non-overlapping windows whose similarity reaches `threshold` (MustDrop's vision stage).

    Args:
        x: (G, h, w, D) token grids.
        window: window side k; only the full windows of the (h // k) x (w // k) tiling are candidates.
        threshold: a window merges when its `window_similarity` is >= threshold.
        valid: optional (G, h, w) bool; a window with any invalid token is never merged.
        size: optional (G, h, w) sizes of the tokens (default 1).
        weighted: merged features are size-weighted means (else plain means).
        backend: "auto", "torch" or "triton" (for the similarity and the merge).
    """
    op = "window_merge"
    check_tensor(op, "x", x, 4)
    g, h, w, d = x.shape
    _check_window(op, window, window, h, w)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise KernelError(f"{op}: threshold must be a number, got {threshold!r}")
    valid = check_mask(op, "valid", valid, (g, h, w), x.device)
    if size is not None and (not isinstance(size, Tensor) or tuple(size.shape) != (g, h, w)):
        raise KernelError(f"{op}: size must be a tensor of shape {(g, h, w)}")
    k = window
    sim = window_similarity(x, k, backend=backend)
    hh, ww = sim.shape[1], sim.shape[2]
    merged = sim >= float(threshold)
    if valid is not None and hh and ww:
        whole = valid[:, : hh * k, : ww * k].reshape(g, hh, k, ww, k).all(4).all(2)
        merged &= whole
    # every token's representative: itself, or the top-left cell of its merged window
    flat = torch.arange(g * h * w, device=x.device).view(g, h, w)
    rep = flat.clone()
    if hh and ww:
        tl_cell = flat[:, : hh * k : k, : ww * k : k]  # (G, hh, ww) top-left of each window
        win_rep = torch.where(merged, tl_cell, -1).repeat_interleave(k, 1).repeat_interleave(k, 2)
        core = rep[:, : hh * k, : ww * k]
        rep[:, : hh * k, : ww * k] = torch.where(win_rep >= 0, win_rep, core)
    rep = rep.flatten()
    is_rep = rep == torch.arange(rep.numel(), device=x.device)
    ids = torch.cumsum(is_rep, 0) - 1
    assign = ids[rep]
    counts = is_rep.view(g, h * w).sum(1)
    m = int(counts.sum())
    feats, sizes = scatter_mean(x.reshape(1, g * h * w, d), assign[None], m,
                                None if size is None else size.reshape(1, -1), weighted, backend=backend, check=False)
    return WindowMerge(feats[0], sizes[0], assign, counts, sim, merged)
