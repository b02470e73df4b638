"""Scatter-mean: merge tokens into groups (the mean of each group's members, optionally size-weighted).

`scatter_mean(x, index, num_out, size, weighted)` is the merge step of every merging reducer: token n of item b
goes into group ``index[b, n]`` (-1: dropped), each group's feature is the mean of its members (weighted by
their `size`, the number of original tokens each stands for, if `weighted`), and each group's size is the sum
of its members' sizes. An empty group gets zeros and size 0.

The torch reference accumulates with `index_add_` in fp32, a block of rows at a time (memory: the output plus
one block; no loop over tokens or groups). The Triton
kernel sorts the tokens by group once (a stable sort, so members are summed in token order, as `index_add_`
does) and lets one program sum each group's members: no atomics, so it is deterministic on the GPU too.
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


def scatter_mean(
    x: Tensor,
    index: Tensor,
    num_out: int,
    size: Tensor | None = None,
    weighted: bool = True,
    *,
    backend: str = "auto",
    check: bool = True,
) -> tuple[Tensor, Tensor]:
    """Group means of `x` by `index`.

    Args:
        x: (B, N, D) or (N, D) features (any float dtype; computed in fp32).
        index: (B, N) or (N,) long group of every token in [0, num_out), or -1 to leave it out.
        num_out: groups per batch element, M.
        size: optional (B, N) or (N,) float, how many original tokens each token stands for (default 1).
        weighted: weight each member by its size (else every member counts once).
        backend: "auto", "torch" or "triton".
        check: verify that no index is >= num_out (one device sync; callers that build the index skip it).

    Returns:
        mean: (B, M, D) (or (M, D)) in the dtype of `x`.
        size: (B, M) (or (M,)) fp32, the summed sizes of each group's members.
    """
    op = "scatter_mean"
    check_tensor(op, "x", x, (2, 3))
    squeeze = x.dim() == 2
    if squeeze:
        x = x[None]
        index = index[None] if isinstance(index, Tensor) else index
        size = size[None] if isinstance(size, Tensor) else size
    bsz, n, d = x.shape
    if not isinstance(index, Tensor) or index.dtype != torch.long or tuple(index.shape) != (bsz, n):
        raise KernelError(f"{op}: index must be a long tensor of shape {(bsz, n)}, got "
                          f"{tuple(index.shape) if isinstance(index, Tensor) else type(index).__name__}")
    if isinstance(num_out, bool) or not isinstance(num_out, int) or num_out < 0:
        raise KernelError(f"{op}: num_out must be an integer >= 0, got {num_out!r}")
    if size is not None and (not isinstance(size, Tensor) or tuple(size.shape) != (bsz, n)):
        raise KernelError(f"{op}: size must be a tensor of shape {(bsz, n)}")
    index = index.to(x.device)
    if check and n and bool((index >= num_out).any()):
        raise KernelError(f"{op}: index has groups >= num_out={num_out}")
    size = torch.ones(bsz, n, device=x.device) if size is None else size.to(x.device, torch.float32)
    # one flat key per (batch, group); dropped tokens go to the spare slot bsz * num_out
    spare = bsz * num_out
    key = torch.where(index >= 0, index + torch.arange(bsz, device=x.device)[:, None] * num_out, spare).flatten()
    if resolve(backend, op, x) == "triton" and n and num_out and d:
        mean, sizes = _scatter_triton(x, key, size, weighted, bsz, num_out)
    else:
        mean, sizes = _scatter_torch(x, key, size, weighted, bsz, num_out)
    return (mean[0], sizes[0]) if squeeze else (mean, sizes)


_BLOCK_ROWS = 4096  # rows of x per step of the torch reference (weighted: one block's products at a time)


def _scatter_torch(x: Tensor, key: Tensor, size: Tensor, weighted: bool, bsz: int, m: int):
    d = x.shape[2]
    flat = x.reshape(-1, d)  # a view for contiguous input
    w = size.flatten()
    sizes = torch.zeros(bsz * m + 1, device=x.device).index_add_(0, key, w)
    den = sizes if weighted else torch.zeros(bsz * m + 1, device=x.device).index_add_(
        0, key, torch.ones_like(w))
    acc = torch.zeros(bsz * m + 1, d, device=x.device)
    for s in range(0, flat.shape[0], _BLOCK_ROWS):  # blocks, so the weighted products never exceed one block
        rows = flat[s:s + _BLOCK_ROWS].float()
        acc.index_add_(0, key[s:s + _BLOCK_ROWS], rows * w[s:s + _BLOCK_ROWS, None] if weighted else rows)
    acc.div_(den.clamp_min(1e-30)[:, None])  # an empty group: 0 / tiny = 0
    return acc[:-1].view(bsz, m, d).to(x.dtype), sizes[:-1].view(bsz, m)


if tl is not None:

    def _scatter_kernel(x_ptr, perm_ptr, off_ptr, size_ptr, out_ptr, osize_ptr, N, D, sxb, sxn, sxd,
                        WEIGHTED: tl.constexpr, BD: tl.constexpr):
        """One program: one group's mean over BD features; its members are perm[off[g]:off[g + 1]]."""
        g = tl.program_id(0)
        pid_d = tl.program_id(1)
        dd = pid_d * BD + tl.arange(0, BD)
        dm = dd < D
        start = tl.load(off_ptr + g)
        end = tl.load(off_ptr + g + 1)
        acc = tl.zeros((BD,), dtype=tl.float32)
        den = tl.zeros((1,), dtype=tl.float32)
        tot = tl.zeros((1,), dtype=tl.float32)
        for j in range(start, end):
            tok = tl.load(perm_ptr + j)
            s = tl.load(size_ptr + tok + tl.zeros((1,), dtype=tl.int64))
            w = s if WEIGHTED else tl.full((1,), 1.0, dtype=tl.float32)
            row = tl.load(x_ptr + (tok // N) * sxb + (tok % N) * sxn + dd * sxd, mask=dm, other=0.0)
            acc += row.to(tl.float32) * w
            den += w
            tot += s
        mean = tl.where(den > 0, acc / tl.maximum(den, 1e-30), 0.0)
        tl.store(out_ptr + g * D + dd, mean.to(out_ptr.dtype.element_ty), mask=dm)
        if pid_d == 0:
            tl.store(osize_ptr + g, tl.sum(tot, axis=0))


def _scatter_triton(x: Tensor, key: Tensor, size: Tensor, weighted: bool, bsz: int, m: int):
    n, d = x.shape[1], x.shape[2]
    perm = torch.argsort(key, stable=True)
    offsets = torch.searchsorted(key[perm], torch.arange(bsz * m + 1, device=x.device))
    out = torch.empty(bsz, m, d, dtype=x.dtype, device=x.device)
    sizes = torch.empty(bsz, m, dtype=torch.float32, device=x.device)
    bd = min(256, next_pow2(d))
    jit(_scatter_kernel)[(bsz * m, triton.cdiv(d, bd))](
        x, perm, offsets, size.contiguous().flatten(), out, sizes, n, d, *x.stride(), WEIGHTED=weighted, BD=bd
    )
    return out, sizes
