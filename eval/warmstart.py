"""Start a model from another checkpoint of the same architecture (`train.py --init DIR`).

Every parameter whose name and shape match is copied. Two kinds are adapted instead of dropped:

- token embeddings (and a separate `lm_head`, if untied) are matched by token *string*, so a checkpoint made with
  an older closed vocabulary still gives every word it knew; words new to the vocabulary keep their fresh init;
- the vision tower's learned position embeddings, a (side * side, D) grid, are resized bicubically to the new
  grid when the tower's image size changed (as timm and transformers do when fine-tuning at a new resolution).

The video recipe uses this to carry a model trained on the plain 112-px look (8 x 8 patches a frame) over to the
rich 168-px look (12 x 12): the decoder keeps what it learned about reading questions and answering them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def resize_grid(weight: torch.Tensor, n: int) -> torch.Tensor:
    """(side * side, D) position embeddings -> (n, D), `n` a square; bicubic on the (side, side) grid."""
    old, new = math.isqrt(weight.shape[0]), math.isqrt(n)
    if old * old != weight.shape[0] or new * new != n:
        raise ValueError(f"position embeddings must form square grids, got {weight.shape[0]} -> {n}")
    grid = weight.float().T.reshape(1, -1, old, old)
    out = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return out.reshape(-1, n).T.to(weight.dtype)


@torch.no_grad()
def warm_start(model: nn.Module, tokenizer, source: str | Path) -> dict[str, int]:
    """Copy `source`'s weights (a `save_pretrained` directory with its tokenizer) into `model` in place.

    Returns counts: `copied` tensors, `resized` position grids, `rows` embedding rows matched by token,
    `fresh` tensors left at their init (shape or name unmatched)."""
    from . import models as M

    source = Path(source)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"--init: {source} is not a saved model directory (no config.json)")
    src, src_tok = M.load(source)
    if type(src) is not type(model):
        raise ValueError(f"--init: {source} holds a {type(src).__name__}, this run trains a {type(model).__name__}")
    old_vocab, new_vocab = src_tok.get_vocab(), tokenizer.get_vocab()
    pairs = [(new_vocab[w], i) for w, i in old_vocab.items() if w in new_vocab]
    dst_rows = torch.tensor([d for d, _ in pairs])
    src_rows = torch.tensor([s for _, s in pairs])
    theirs = dict(src.named_parameters())
    counts = dict(copied=0, resized=0, rows=0, fresh=0)
    embeddings = {name for name, p in model.named_parameters()
                  if p.ndim == 2 and p.shape[0] == len(tokenizer) and name in theirs
                  and theirs[name].shape[0] == len(src_tok)}
    for name, p in model.named_parameters():
        q = theirs.get(name)
        if q is None:
            counts["fresh"] += 1
        elif name in embeddings:
            p[dst_rows] = q[src_rows].to(p.dtype)
            counts["rows"] += len(pairs)
        elif q.shape == p.shape:
            p.copy_(q)
            counts["copied"] += 1
        elif name.endswith("position_embedding.weight") and q.shape[1:] == p.shape[1:]:
            p.copy_(resize_grid(q, p.shape[0]))
            counts["resized"] += 1
        else:
            counts["fresh"] += 1
    return counts
