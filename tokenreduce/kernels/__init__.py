"""Fused similarity kernels (Triton), each with the pure-torch reference it must match, behind one dispatch.

Every operation is one module with one public entry point taking ``backend="auto" | "torch" | "triton"``:
"auto" runs the Triton kernel when triton is installed and the tensors are on a CUDA device, the torch
reference otherwise. Both give the same result (indices exactly, values to fp32 rounding), including ties,
masks and empty inputs, so a reducer behaves the same on every backend. The torch references are meant as
good CPU code too: blockwise, memory linear in the tokens, no Python loop over tokens or frames.

- `bipartite_match` (match.py): best cosine match in `b` of every row of `a`, without the Na x Nb matrix.
- `scatter_mean` (merge.py): merge tokens into groups, size-weighted or not, with the groups' sizes.
- `window_similarity`, `window_merge` (window.py): windows of a token grid (any size and stride) scored by
  mean pairwise cosine; the thresholded non-overlapping window merge of MustDrop's vision stage.
- `token_similarity`, `frame_similarity`, `running_mean_similarity` (temporal.py): per-token cosine between
  frames, with the previous frame, and with the running mean of the frames so far (STC).
- `segment_topk` (topk.py): the top k of every image/crop/frame of a flat token list in one call.

`use_backend("torch" | "triton")` makes "auto" mean that backend inside a ``with`` block. Triton compiles
each kernel on first use; on a machine without a GPU, ``TRITON_INTERPRET=1`` runs them in Triton's CPU
interpreter (for tests: it is 100-1000x slower than torch).
"""

from ._backend import KernelError, interpreting, triton_available, use_backend
from .match import bipartite_match
from .merge import scatter_mean
from .temporal import RunningMean, frame_similarity, running_mean_similarity, token_similarity
from .topk import segment_topk
from .window import WindowMerge, window_merge, window_similarity

__all__ = [
    "KernelError",
    "RunningMean",
    "WindowMerge",
    "bipartite_match",
    "frame_similarity",
    "interpreting",
    "running_mean_similarity",
    "scatter_mean",
    "segment_topk",
    "token_similarity",
    "triton_available",
    "use_backend",
    "window_merge",
    "window_similarity",
]
