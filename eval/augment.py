"""Generic random reductions of visual tokens, for reduction-aware training (`train.py --reduce-frac`).

A real VLM answers from what its visual tokens *show*, wherever they sit in the sequence; a tiny model trained
only on full grids learns instead to read a token's grid cell from its offset in the sequence, and then any
token removed before the LLM scrambles the picture. Training on part of the batches with their visual tokens
randomly dropped, pooled or merged, the survivors packed at consecutive positions (as the papers' pre-LLM
reducers do), takes that shortcut away: the cell and the frame must come from the features themselves (the
vision tower's position embeddings) and from the order of the tokens.

These are deliberately generic and content-blind, never the reducers under test (no attention or similarity
scores, no learned selection):

- `drop`: keep a uniformly random subset of the tokens, in order (each sample its own subset);
- `pool`: average over an adaptive grid of windows (each frame pooled to h x w, random aspect);
- `merge`: pick random seed tokens and average every token into its nearest seed (grid distance, frames
  counting `FRAME_DISTANCE` cells apart, random tie-breaks): random spatial (and temporal) clusters;
- `time` (videos): average pairs of consecutive frames, then pool each pair spatially.

Every reduction is an averaging matrix `A` of shape (B, K, N): reduced = A @ tokens (rows sum to 1, one row per
kept token, in sequence order), so per-token targets follow by the same product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

METHODS: tuple[str, ...] = ("drop", "pool", "merge", "time")
#: how many cells apart two frames count for `merge`'s nearest-seed rule
FRAME_DISTANCE = 2.0


@dataclass(frozen=True)
class Reduction:
    """One batch's reduction: `method` (one of `METHODS`) at roughly `keep` of the tokens."""

    method: str
    keep: float

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"reduction method must be one of {METHODS}, got {self.method!r}")
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")


def draw(rng: np.random.Generator, frac: float, methods: tuple[str, ...], keep_range: tuple[float, float]
         ) -> Reduction | None:
    """The reduction of one batch: None (full tokens) with probability 1 - `frac`, else a method drawn uniformly
    from `methods` at a keep ratio log-uniform in `keep_range`."""
    if frac <= 0 or rng.random() >= frac:
        return None
    lo, hi = keep_range
    keep = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    return Reduction(methods[int(rng.integers(len(methods)))], keep)


def _pool_1d(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) adaptive average pooling weights (the windows of torch's adaptive_avg_pool)."""
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        a, b = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
        w[i, a:b] = 1.0 / (b - a)
    return w


def _pool_shape(keep: float, side: int, rng: np.random.Generator) -> tuple[int, int]:
    """(h, w) with h * w close to keep * side^2, with a random aspect (at most 2:1)."""
    area = max(keep * side * side, 1.0)
    aspect = float(np.exp(rng.uniform(-np.log(2), np.log(2)))) if rng.random() < 0.5 else 1.0
    h = int(min(side, max(1, round(math.sqrt(area * aspect)))))
    w = int(min(side, max(1, round(area / h))))
    return h, w


def matrix(reduction: Reduction, batch: int, frames: int, side: int, rng: np.random.Generator) -> Tensor:
    """(batch, K, N) averaging matrix for `frames` x `side` x `side` tokens in raster order per frame
    (N = frames * side^2); K is the same for every sample."""
    n = frames * side * side
    if reduction.method == "drop":
        k = max(1, round(reduction.keep * n))
        a = np.zeros((batch, k, n), dtype=np.float32)
        for b in range(batch):
            kept = np.sort(rng.choice(n, size=k, replace=False))
            a[b, np.arange(k), kept] = 1.0
        return torch.from_numpy(a)
    if reduction.method in ("pool", "time"):
        t_out = frames if reduction.method == "pool" or frames == 1 else -(-frames // 2)
        keep = min(1.0, reduction.keep * frames / t_out)
        h, w = _pool_shape(keep, side, rng)
        grid = np.kron(_pool_1d(h, side), _pool_1d(w, side))  # (h*w, side*side)
        full = np.kron(_pool_1d(t_out, frames), grid).astype(np.float32)  # frames in order, then rows, columns
        return torch.from_numpy(full).expand(batch, -1, -1).contiguous()
    # merge: random seeds, every token joins its nearest seed
    k = max(1, round(reduction.keep * n))
    t, r, c = np.unravel_index(np.arange(n), (frames, side, side))
    coords = np.stack([t * FRAME_DISTANCE, r, c], axis=1).astype(np.float64)
    a = np.zeros((batch, k, n), dtype=np.float32)
    for b in range(batch):
        seeds = np.sort(rng.choice(n, size=k, replace=False))
        d = ((coords[:, None, :] - coords[None, seeds, :]) ** 2).sum(-1) + rng.uniform(0, 1e-3, size=(n, k))
        owner = d.argmin(axis=1)
        a[b, owner, np.arange(n)] = 1.0
        a[b] /= a[b].sum(axis=1, keepdims=True)
    return torch.from_numpy(a)


def apply(a: Tensor, tokens: Tensor) -> Tensor:
    """(B, K, N) averaging matrix and (B, N, D) tokens -> (B, K, D) reduced tokens, in the tokens' dtype."""
    return torch.bmm(a.to(tokens.dtype), tokens)


def reduce_mask(a: Tensor, mask: Tensor) -> Tensor:
    """(B, K, N) matrix and a (B, N) bool mask -> (B, K) bool: a kept token is marked if any token in it is."""
    return torch.bmm(a, mask.float()[..., None])[..., 0] > 0
