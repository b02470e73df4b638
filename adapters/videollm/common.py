"""Shared pieces of the video adapters: frame layouts and video model inputs built by hand.

transformers' video processors need torchvision, which cannot be installed next to the CPU torch used
here, so `video_inputs` builds `pixel_values_videos` and expands the video placeholder itself, exactly
as the models' processors do (resize, rescale, normalise; one placeholder per visual token).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from tokenreduce.adapter import ImageLayout
from tokenreduce.errors import InputError
from tokenreduce.tokens import ItemInfo, VisualTokens


@dataclass(frozen=True)
class VideoSpec:
    """How a video model wants its frames: tower input size, normalisation, placeholders per video.

    Attributes:
        size: frames are resized to size x size.
        mean, std: per-channel normalisation after scaling to [0, 1].
        tokens: number of frames -> placeholders the processor puts in the prompt for one video.
        token: the video placeholder string.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    tokens: Callable[[int], int]
    token: str = "<video>"


def frame_layout(num_frames: int, grid: tuple[int, int], cls: bool = False, newline: Tensor | None = None
                 ) -> ImageLayout:
    """Layout of one video: frames one after another, each a grid in raster order.

    Args:
        num_frames: T.
        grid: (h, w) tokens per frame as the LLM sees them.
        cls: every frame starts with its CLS token (Video-LLaVA), an extra token kept iff a token of
            that frame survives; its features come from the tower.
        newline: (D,) a single newline after the last frame (LLaVA-OneVision), kept iff any token survives.
    """
    h, w = grid
    n = h * w
    per = n + int(cls)
    t = torch.arange(num_frames).repeat_interleave(n)
    slots = t * per + int(cls) + torch.arange(n).repeat(num_frames)
    items = [ItemInfo(kind="frame", index=i) for i in range(num_frames)]
    lay = ImageLayout(items=items, grids=[grid] * num_frames, slots=slots, length=num_frames * per)
    if cls:
        lay.extra_slots = torch.arange(num_frames) * per
        lay.extra_owner = t
    elif newline is not None:
        lay.extra_slots = torch.tensor([num_frames * n])
        lay.extra_owner = torch.zeros(num_frames * n, dtype=torch.long)
        lay.extra_features = newline[None]
        lay.length += 1
    return lay


def tower_grid_tokens(batch: list[VisualTokens], grid: tuple[int, int]) -> list[VisualTokens]:
    """The same items on the tower's finer `grid` (before the model pools)."""
    out = []
    for v in batch:
        n = v.num_items * grid[0] * grid[1]
        # positions are not placeholders here (0 marks them as real tokens, not anyres padding); the
        # adapter maps these tower tokens onto the LLM's placeholders after pooling
        out.append(VisualTokens.from_items([torch.zeros(grid[0] * grid[1], 0)] * v.num_items, [grid] * v.num_items,
                                           torch.zeros(n, dtype=torch.long), list(v.items)))
    return out


def full_grid_features(batch: list[VisualTokens], what: str) -> Tensor:
    """(G, h*w, Dv) features of every item, which must still hold its whole tower grid."""
    for v in batch:
        if len(v) != v.num_original or bool((v.source != torch.arange(len(v), device=v.source.device)).any()):
            raise InputError(
                f"{what} pools every frame's full grid after the vision tower, so reducers inside the tower "
                "cannot change the frame's tokens on this model; reduce at the VISUAL stage instead"
            )
    g = sum(v.num_items for v in batch)
    return torch.cat([v.features for v in batch]).reshape(g, -1, batch[0].features.shape[-1])


def pooled_scores(tower: list[VisualTokens], llm: list[VisualTokens], grid: tuple[int, int], stride: int
                  ) -> list[VisualTokens]:
    """Carry the tower tokens' scores (attention mass) to the pooled grid: summed over each stride x stride window.

    Vector-valued scores (the tower's keys) do not carry over: a pooled token has no keys of its own.
    """
    if not tower or not tower[0].scores:
        return llm
    out = []
    for t, v in zip(tower, llm):
        scores = {}
        for name, s in t.scores.items():
            if s.dim() != 1:
                continue
            x = s.reshape(t.num_items, 1, *grid).float()
            scores[name] = (torch.nn.functional.avg_pool2d(x, stride) * stride * stride).flatten()
        out.append(v.with_scores(**scores))
    return out


def video_pixel_values(frames: np.ndarray, spec: VideoSpec) -> Tensor:
    """(T, H, W, 3) uint8 frames -> (T, 3, size, size) float, as the model's processor would give them."""
    if not isinstance(frames, np.ndarray):
        raise InputError(f"frames must be a (T, H, W, 3) uint8 numpy array, got {type(frames).__name__}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise InputError(f"frames must be a (T, H, W, 3) uint8 array, got {frames.dtype} {frames.shape}")
    if 0 in frames.shape:
        raise InputError(f"frames must hold at least one non-empty frame, got shape {frames.shape}")
    out = np.stack([np.asarray(Image.fromarray(f).resize((spec.size, spec.size), Image.BICUBIC)) for f in frames])
    x = torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(spec.mean)[None, :, None, None]
    std = torch.tensor(spec.std)[None, :, None, None]
    return (x - mean) / std


def video_inputs(tokenizer, spec: VideoSpec, texts: Sequence[str], videos: Sequence[np.ndarray]
                 ) -> dict[str, Tensor]:
    """Model inputs for prompts with one `spec.token` each and one video per prompt (equal frame counts).

    Returns input_ids and attention_mask (left-padded by the tokenizer) and pixel_values_videos (B, T, 3, S, S).
    """
    if len(texts) != len(videos):
        raise InputError(f"{len(texts)} prompts but {len(videos)} videos: give one video per prompt")
    for i, v in enumerate(videos):
        if not isinstance(v, np.ndarray) or v.ndim != 4 or v.shape[0] == 0:
            shape = getattr(v, "shape", type(v).__name__)
            raise InputError(f"video {i} must be a (T, H, W, 3) uint8 array with T >= 1 frames, got {shape}")
    counts = {v.shape[0] for v in videos}
    if len(counts) != 1:
        raise InputError(f"videos in one batch need the same number of frames, got {sorted(counts)}")
    expanded = []
    for i, text in enumerate(texts):
        if text.count(spec.token) != 1:
            raise InputError(f"prompt {i} must contain {spec.token!r} exactly once, got {text.count(spec.token)}")
        expanded.append(text.replace(spec.token, spec.token * spec.tokens(videos[i].shape[0])))
    enc = tokenizer(expanded, padding=True, return_tensors="pt")
    pv = torch.stack([video_pixel_values(v, spec) for v in videos])
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "pixel_values_videos": pv}
