"""Placeholder bookkeeping: find the visual placeholders of a prompt and repack shorter sequences."""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import InputError


def placeholder_runs(input_ids: Tensor, attention_mask: Tensor, token_ids: Tensor) -> list[list[Tensor]]:
    """Contiguous runs of placeholder ids per sample.

    Args:
        input_ids: (B, L) long.
        attention_mask: (B, L), 0 on padding.
        token_ids: (P,) long, the placeholder ids (image and/or video).

    Returns:
        per sample, a list of (n_run,) long tensors of positions, in sequence order.
    """
    is_ph = torch.isin(input_ids, token_ids) & attention_mask.bool()
    out = []
    for b in range(input_ids.shape[0]):
        pos = torch.nonzero(is_ph[b]).flatten()
        if pos.numel() == 0:
            out.append([])
            continue
        # a new run starts where the position jumps or the placeholder id changes
        ids = input_ids[b, pos]
        brk = torch.ones_like(pos, dtype=torch.bool)
        brk[1:] = (pos[1:] != pos[:-1] + 1) | (ids[1:] != ids[:-1])
        starts = torch.nonzero(brk).flatten().tolist() + [pos.numel()]
        out.append([pos[s:e] for s, e in zip(starts[:-1], starts[1:])])
    return out


def split_runs(runs: list[Tensor], counts: list[int], sample: int) -> list[Tensor]:
    """Cut a sample's placeholder runs into consecutive pieces of `counts` tokens (one per image).

    A processor may put two images back to back, which makes one run; images are then cut by count.
    """
    pos = torch.cat(runs) if runs else torch.zeros(0, dtype=torch.long)
    if pos.numel() != sum(counts):
        raise InputError(
            f"sample {sample}: the prompt has {pos.numel()} visual placeholder tokens but its images give "
            f"{sum(counts)} features; let the model's processor expand the image token"
        )
    return list(torch.split(pos, counts))


def repack(
    input_ids: Tensor, attention_mask: Tensor, keep: list[Tensor], pad_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Build the shorter, left-padded sequences that keep positions `keep[b]` of each sample.

    Args:
        input_ids: (B, L) the caller's ids.
        attention_mask: (B, L) the caller's mask.
        keep: per sample, sorted (L_b,) long caller positions to keep.
        pad_id: id used for padding.

    Returns:
        ids: (B, L') long, mask: (B, L') long, positions: (B, L') long caller position of each slot (-1: pad).
    """
    b = input_ids.shape[0]
    length = max(int(k.numel()) for k in keep)
    device = input_ids.device
    ids = torch.full((b, length), pad_id, dtype=input_ids.dtype, device=device)
    mask = torch.zeros((b, length), dtype=attention_mask.dtype, device=device)
    positions = torch.full((b, length), -1, dtype=torch.long, device=device)
    for i, k in enumerate(keep):
        n = k.numel()
        if n == 0:
            continue
        ids[i, length - n :] = input_ids[i, k]
        mask[i, length - n :] = 1
        positions[i, length - n :] = k
    return ids, mask, positions
