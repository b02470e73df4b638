"""Bipartite matching: for every row of `a`, its most cosine-similar row of `b`, without the Na x Nb matrix.

`bipartite_match(a, b, mask_a, mask_b)` is the matching step of ToMe-style merging (AIM): for each source token
the best destination and the similarity. The torch reference walks `b` in blocks of `block` rows, keeping a
running maximum (memory O(Na x block)); the Triton kernel does the same per tile of `a` in registers, with the
norms computed on the fly (one pass over the features, memory O(Na + Nb)).

Semantics, identical on both backends:
- cos(a_i, b_j) = (a_i . b_j) / (max(|a_i|, eps) * max(|b_j|, eps)) in fp32, eps = 1e-12 (a zero row has
  similarity 0 to everything, as with `F.normalize`);
- rows of `b` outside `mask_b` are never chosen; ties go to the lowest index of `b`;
- a row of `a` outside `mask_a`, or with no valid row of `b` at all, gets value -inf and index -1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._backend import KernelError, check_mask, check_tensor, jit, next_pow2, resolve

EPS = 1e-12

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference needs neither
    triton = tl = None


def bipartite_match(
    a: Tensor,
    b: Tensor,
    mask_a: Tensor | None = None,
    mask_b: Tensor | None = None,
    *,
    backend: str = "auto",
    block: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Best cosine match in `b` of every row of `a`.

    Args:
        a: (B, Na, D) or (Na, D) sources (any float dtype; strided views such as ``x[:, ::2]`` are fine).
        b: (B, Nb, D) or (Nb, D) destinations.
        mask_a: optional (B, Na) bool, rows of `a` to match (others get -inf / -1).
        mask_b: optional (B, Nb) bool, rows of `b` that may be chosen.
        backend: "auto", "torch" or "triton" (see `tokenreduce.kernels`).
        block: rows of `b` per step of the torch reference (its memory is B x Na x block floats).

    Returns:
        values: (B, Na) fp32 cosine similarity of the best match (-inf where there is none).
        indices: (B, Na) long index into `b` of the best match (-1 where there is none).
    """
    op = "bipartite_match"
    check_tensor(op, "a", a, (2, 3))
    check_tensor(op, "b", b, (2, 3))
    if a.dim() != b.dim():
        raise KernelError(f"{op}: a and b must both be 2-D or both 3-D, got shapes {tuple(a.shape)} and "
                          f"{tuple(b.shape)}")
    squeeze = a.dim() == 2
    if squeeze:
        a, b = a[None], b[None]
        mask_a = None if mask_a is None else mask_a[None]
        mask_b = None if mask_b is None else mask_b[None]
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise KernelError(f"{op}: a {tuple(a.shape)} and b {tuple(b.shape)} must agree in batch and feature size")
    if a.device != b.device:
        raise KernelError(f"{op}: a is on {a.device} and b on {b.device}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise KernelError(f"{op}: block must be a positive integer, got {block!r}")
    bsz, na, _ = a.shape
    mask_a = check_mask(op, "mask_a", mask_a, (bsz, na), a.device)
    mask_b = check_mask(op, "mask_b", mask_b, (bsz, b.shape[1]), a.device)
    if resolve(backend, op, a, b) == "triton" and na and b.shape[1]:
        values, indices = _match_triton(a, b, mask_a, mask_b)
    else:
        values, indices = _match_torch(a, b, mask_a, mask_b, block)
    return (values[0], indices[0]) if squeeze else (values, indices)


def _match_torch(a: Tensor, b: Tensor, mask_a: Tensor | None, mask_b: Tensor | None, block: int):
    bsz, na, _ = a.shape
    nb = b.shape[1]
    best = torch.full((bsz, na), float("-inf"), device=a.device)
    index = torch.full((bsz, na), -1, dtype=torch.long, device=a.device)
    if na == 0 or nb == 0:
        return best, index
    af = a.float()
    na_ = af.norm(dim=-1).clamp_min(EPS)  # (B, Na)
    for start in range(0, nb, block):
        bf = b[:, start:start + block].float()
        sim = af @ bf.transpose(1, 2)  # (B, Na, blk)
        sim.div_(na_[:, :, None]).div_(bf.norm(dim=-1).clamp_min(EPS)[:, None, :])
        if mask_b is not None:
            sim.masked_fill_(~mask_b[:, None, start:start + block], float("-inf"))
        v, i = sim.max(dim=-1)  # first maximum within the block
        better = v > best  # strict: an earlier block keeps its tie
        best = torch.where(better, v, best)
        index = torch.where(better, i + start, index)
    if mask_a is not None:
        best = best.masked_fill(~mask_a, float("-inf"))
    index = index.masked_fill(best == float("-inf"), -1)
    return best, index


if tl is not None:

    def _match_kernel(a_ptr, b_ptr, ma_ptr, mb_ptr, val_ptr, idx_ptr, NA, NB, D,
                      sab, san, sad, sbb, sbn, sbd, smab, sman, smbb, smbn,
                      HAS_MA: tl.constexpr, HAS_MB: tl.constexpr, HALF: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
        """One program: BM rows of `a` of one batch element against every row of `b`, BN at a time."""
        pid_m = tl.program_id(0)
        pid_b = tl.program_id(1)
        rows = pid_m * BM + tl.arange(0, BM)
        row_ok = rows < NA
        a_base = a_ptr + pid_b * sab
        b_base = b_ptr + pid_b * sbb
        # |a_i|^2, once
        na2 = tl.zeros((BM,), dtype=tl.float32)
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD)
            at = tl.load(a_base + rows[:, None] * san + dd[None, :] * sad,
                         mask=row_ok[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32)
            na2 += tl.sum(at * at, axis=1)
        na = tl.maximum(tl.sqrt(na2), 1e-12)
        best = tl.full((BM,), float("-inf"), dtype=tl.float32)
        best_i = tl.full((BM,), -1, dtype=tl.int64)
        for n0 in range(0, NB, BN):
            cols = n0 + tl.arange(0, BN)
            col_ok = cols < NB
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            nb2 = tl.zeros((BN,), dtype=tl.float32)
            for d0 in range(0, D, BD):
                dd = d0 + tl.arange(0, BD)
                dm = dd < D
                at = tl.load(a_base + rows[:, None] * san + dd[None, :] * sad,
                             mask=row_ok[:, None] & dm[None, :], other=0.0)
                bt = tl.load(b_base + cols[:, None] * sbn + dd[None, :] * sbd,
                             mask=col_ok[:, None] & dm[None, :], other=0.0)
                if HALF:  # fp16/bf16 products are exact in fp32: tensor cores, fp32 accumulation
                    acc = tl.dot(at, tl.trans(bt), acc)
                else:
                    acc = tl.dot(at.to(tl.float32), tl.trans(bt.to(tl.float32)), acc, input_precision="ieee")
                bf = bt.to(tl.float32)
                nb2 += tl.sum(bf * bf, axis=1)
            nb = tl.maximum(tl.sqrt(nb2), 1e-12)
            sim = acc / (na[:, None] * nb[None, :])
            ok = col_ok
            if HAS_MB:
                ok = ok & (tl.load(mb_ptr + pid_b * smbb + cols * smbn, mask=col_ok, other=0) != 0)
            sim = tl.where(ok[None, :], sim, float("-inf"))
            v, i = tl.max(sim, axis=1, return_indices=True, return_indices_tie_break_left=True)
            better = v > best
            best = tl.where(better, v, best)
            best_i = tl.where(better, (i + n0).to(tl.int64), best_i)
        if HAS_MA:
            keep = tl.load(ma_ptr + pid_b * smab + rows * sman, mask=row_ok, other=0) != 0
            best = tl.where(keep, best, float("-inf"))
        best_i = tl.where(best == float("-inf"), -1, best_i)
        tl.store(val_ptr + pid_b * NA + rows, best, mask=row_ok)
        tl.store(idx_ptr + pid_b * NA + rows, best_i, mask=row_ok)


def _match_triton(a: Tensor, b: Tensor, mask_a: Tensor | None, mask_b: Tensor | None):
    bsz, na, d = a.shape
    nb = b.shape[1]
    values = torch.empty(bsz, na, dtype=torch.float32, device=a.device)
    indices = torch.empty(bsz, na, dtype=torch.long, device=a.device)
    half = a.dtype in (torch.float16, torch.bfloat16) and a.dtype == b.dtype
    if not half:
        a, b = a.float(), b.float()
    ma = mask_a.to(torch.int8) if mask_a is not None else values  # a dummy pointer when absent
    mb = mask_b.to(torch.int8) if mask_b is not None else values
    bm = min(64, next_pow2(na))
    bn = min(64, next_pow2(nb))
    bd = min(64, next_pow2(d))
    grid = (triton.cdiv(na, bm), bsz)
    jit(_match_kernel)[grid](
        a, b, ma, mb, values, indices, na, nb, d,
        *a.stride(), *b.stride(), *(ma.stride()[:2] if mask_a is not None else (0, 0)),
        *(mb.stride()[:2] if mask_b is not None else (0, 0)),
        HAS_MA=mask_a is not None, HAS_MB=mask_b is not None, HALF=half, BM=bm, BN=bn, BD=bd,
    )
    return values, indices
