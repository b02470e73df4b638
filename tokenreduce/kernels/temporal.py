"""Temporal per-token similarity of video frames (what STC's cacher and pruner score tokens by).

- `token_similarity(x, ref)`: cos(x[t, i], ref[t, i]) for every token, with `ref` either per frame (T, N, D)
  or one reference frame (N, D) for all (STC's cacher: each token against the same position of a cached
  reference frame).
- `frame_similarity(x, prev)`: each token against the same token of the previous frame; frame 0 against
  `prev` (the last frame of the previous chunk of a stream), or -inf when there is none ("all new").
- `running_mean_similarity(x, state)`: each token against the running mean of the frames so far: the anchor
  of frame t is the mean of the frame means (over tokens) of every frame up to and including t, plus those of
  earlier calls carried in `state` (`RunningMean`). With one frame per chunk this is STC-Pruner's temporal
  (memory) anchor; pass the chunk's channel subset as `x` to score in that subspace. STC's Gaussian kernel
  of unit vectors follows from the cosine: |u - v|^2 = 2 - 2 cos.

Cosines are (x . y) / (max(|x|, eps) max(|y|, eps)) in fp32, eps = 1e-12. The torch reference walks the
frames in blocks (memory O(block x N x D), no loop over single frames or tokens); the Triton kernel reads x and
the reference once, with the reference broadcast through zero strides (nothing is expanded in memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._backend import KernelError, check_tensor, jit, next_pow2, resolve
from .match import EPS

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

_BLOCK_ELEMENTS = 1 << 22  # floats per step of the torch reference (16 MiB)


@dataclass
class RunningMean:
    """State of `running_mean_similarity` across calls: the sum of the frame means so far, and their count.

    Attributes:
        total: (D,) fp32 sum of the frame means seen.
        count: frames seen.
    """

    total: Tensor
    count: int


def token_similarity(x: Tensor, ref: Tensor, *, backend: str = "auto") -> Tensor:
    """(T, N) fp32 cosine of every token of `x` (T, N, D) with the same token of `ref` ((T, N, D) or (N, D))."""
    op = "token_similarity"
    check_tensor(op, "x", x, 3)
    check_tensor(op, "ref", ref, (2, 3))
    t, n, d = x.shape
    if ref.dim() == 2:
        if tuple(ref.shape) != (n, d):
            raise KernelError(f"{op}: ref must have shape {(n, d)} or {(t, n, d)}, got {tuple(ref.shape)}")
        ref = ref[None].expand(t, n, d)  # a view with stride 0 over frames
    elif tuple(ref.shape) != (t, n, d):
        raise KernelError(f"{op}: ref must have shape {(n, d)} or {(t, n, d)}, got {tuple(ref.shape)}")
    return _cos(x, ref.to(x.device), resolve(backend, op, x, ref))


def frame_similarity(x: Tensor, prev: Tensor | None = None, *, backend: str = "auto") -> Tensor:
    """(T, N) fp32: cos of every token with the same token of the previous frame.

    Args:
        x: (T, N, D) frames in time order.
        prev: optional (N, D), the frame before x[0]; without it frame 0 gets -inf.
    """
    op = "frame_similarity"
    check_tensor(op, "x", x, 3)
    t, n, d = x.shape
    if prev is not None:
        check_tensor(op, "prev", prev, 2)
        if tuple(prev.shape) != (n, d):
            raise KernelError(f"{op}: prev must have shape {(n, d)}, got {tuple(prev.shape)}")
    kind = resolve(backend, op, x, prev)
    out = torch.empty(t, n, device=x.device)
    if t == 0:
        return out
    out[1:] = _cos(x[1:], x[:-1], kind)
    out[0] = _cos(x[:1], prev[None].to(x.device), kind)[0] if prev is not None else float("-inf")
    return out


def running_mean_similarity(
    x: Tensor, state: RunningMean | None = None, *, backend: str = "auto"
) -> tuple[Tensor, RunningMean]:
    """(T, N) fp32 cos of every token with the running mean of the frame means up to its frame, and the new state.

    Args:
        x: (T, N, D) frames in time order (N >= 1).
        state: what earlier calls returned (None: the stream starts here).
    """
    op = "running_mean_similarity"
    check_tensor(op, "x", x, 3)
    t, n, d = x.shape
    if n == 0:
        raise KernelError(f"{op}: frames need at least one token, got shape {tuple(x.shape)}")
    if state is not None and (not isinstance(state, RunningMean) or tuple(state.total.shape) != (d,)):
        raise KernelError(f"{op}: state must be the RunningMean of earlier frames with {d} features")
    kind = resolve(backend, op, x)
    total = torch.zeros(d, device=x.device) if state is None else state.total.to(x.device, torch.float32)
    count = 0 if state is None else int(state.count)
    if t == 0:
        return torch.empty(0, n, device=x.device), RunningMean(total, count)
    sums = total + torch.cumsum(x.float().mean(1), 0)  # (T, D)
    anchor = sums / torch.arange(count + 1, count + t + 1, device=x.device, dtype=torch.float32)[:, None]
    sim = _cos(x, anchor[:, None, :].expand(t, n, d), kind)
    return sim, RunningMean(sums[-1], count + t)


def _cos(x: Tensor, y: Tensor, kind: str) -> Tensor:
    t, n, d = x.shape
    if kind == "triton" and t and n:
        return _cos_triton(x, y)
    out = torch.empty(t, n, device=x.device)
    step = max(1, _BLOCK_ELEMENTS // max(1, n * d))
    for s in range(0, t, step):
        xf, yf = x[s:s + step].float(), y[s:s + step].float()
        dot = (xf * yf).sum(-1)
        out[s:s + step] = dot / (xf.norm(dim=-1).clamp_min(EPS) * yf.norm(dim=-1).clamp_min(EPS))
    return out


if tl is not None:

    def _cos_kernel(x_ptr, y_ptr, out_ptr, N, D, sxt, sxn, sxd, syt, syn, syd,
                    BN: tl.constexpr, BD: tl.constexpr):
        """One program: BN tokens of one frame; dot product and both norms in one pass over the features."""
        pid_n = tl.program_id(0)
        t = tl.program_id(1)
        rows = pid_n * BN + tl.arange(0, BN)
        ok = rows < N
        dot = tl.zeros((BN,), dtype=tl.float32)
        nx = tl.zeros((BN,), dtype=tl.float32)
        ny = tl.zeros((BN,), dtype=tl.float32)
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD)
            m = ok[:, None] & (dd[None, :] < D)
            a = tl.load(x_ptr + t * sxt + rows[:, None] * sxn + dd[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
            b = tl.load(y_ptr + t * syt + rows[:, None] * syn + dd[None, :] * syd, mask=m, other=0.0).to(tl.float32)
            dot += tl.sum(a * b, axis=1)
            nx += tl.sum(a * a, axis=1)
            ny += tl.sum(b * b, axis=1)
        cos = dot / (tl.maximum(tl.sqrt(nx), 1e-12) * tl.maximum(tl.sqrt(ny), 1e-12))
        tl.store(out_ptr + t * N + rows, cos, mask=ok)


def _cos_triton(x: Tensor, y: Tensor) -> Tensor:
    t, n, d = x.shape
    out = torch.empty(t, n, dtype=torch.float32, device=x.device)
    bn = min(64, next_pow2(n))
    bd = min(128, next_pow2(max(d, 1)))
    jit(_cos_kernel)[(triton.cdiv(n, bn), t)](x, y, out, n, d, *x.stride(), *y.stride(), BN=bn, BD=bd)
    return out
