"""Qwen2-VL / Qwen2.5-VL built from config (no downloads), and their inputs built by hand.

transformers' Qwen2-VL processor needs its video processor, which needs torchvision (not installable next to
the CPU torch used here), so `qwen_inputs` does what the processor does: resize to multiples of 28 pixels,
normalise, cut 14x14x2 patches in the merger's 2x2 block order, and expand each image or video marker into
`<|vision_start|>` + one pad token per merged token + `<|vision_end|>`, with `mm_token_type_ids`.

Random weights: these exercise the plumbing and measure speed; they do not answer questions.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from tokenreduce.errors import InputError

from ..llava.processing import byte_tokenizer

QWEN_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096,
                  rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6})
_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6})

#: name -> (model class, config class, vision config kwargs, text config kwargs)
PRESETS = {
    "tiny-qwen2-vl": (Qwen2VLForConditionalGeneration, Qwen2VLConfig,
                      dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2), _TINY_TEXT),
    "tiny-qwen2.5-vl": (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig,
                        dict(depth=4, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=4,
                             window_size=56, fullatt_block_indexes=[1, 3]), _TINY_TEXT),
    # Qwen2-VL-7B widths: a 32-layer 1280-wide ViT (patch 14, 2x2 merger) and Qwen2-7B (3584 wide, 28 layers)
    "qwen2-vl-7b-shape": (Qwen2VLForConditionalGeneration, Qwen2VLConfig,
                          dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4), _7B_TEXT),
    "qwen2.5-vl-7b-shape": (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig,
                            dict(depth=32, hidden_size=1280, intermediate_size=3420, out_hidden_size=3584,
                                 num_heads=16, window_size=112, fullatt_block_indexes=[7, 15, 23, 31]), _7B_TEXT),
}


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """The byte-level tokenizer with Qwen2-VL's chat and vision special tokens added (left padding)."""
    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>", *QWEN_SPECIAL]})
    return tok


def build_qwen(preset: str = "tiny-qwen2-vl", seed: int = 0, attn: str = "sdpa", dtype: torch.dtype = torch.float32,
               llm_layers: int | None = None, vision_layers: int | None = None):
    """A random-weight Qwen2-VL / Qwen2.5-VL from a preset, deterministic in `seed`; returns (model, tokenizer)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown Qwen preset {preset!r}; choose from {', '.join(PRESETS)}")
    model_cls, cfg_cls, vkw, tkw = PRESETS[preset]
    vkw, tkw = dict(vkw), dict(tkw)
    if llm_layers is not None:
        tkw["num_hidden_layers"] = llm_layers
    if vision_layers is not None:
        vkw["depth"] = vision_layers
        if "fullatt_block_indexes" in vkw:  # keep a full-attention layer every quarter of the depth
            vkw["fullatt_block_indexes"] = sorted({max(0, vision_layers * k // 4 - 1) for k in range(1, 5)})
    tok = qwen_tokenizer()
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    tkw.update(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id)
    cfg = cfg_cls(vision_config=vkw, text_config=tkw, **ids)
    cfg._attn_implementation = attn
    for sub in (cfg.vision_config, cfg.text_config):
        sub._attn_implementation = attn
    torch.manual_seed(seed)
    model = model_cls(cfg).to(dtype).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def smart_size(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
               max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Qwen2-VL's resize rule: multiples of `factor`, area within [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"aspect ratio {max(height, width) / min(height, width):.0f} is above Qwen2-VL's 200")
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = (height * width / max_pixels) ** 0.5
        h, w = max(factor, int(height / beta // factor) * factor), max(factor, int(width / beta // factor) * factor)
    elif h * w < min_pixels:
        beta = (min_pixels / (height * width)) ** 0.5
        h, w = -(-int(height * beta) // factor) * factor, -(-int(width * beta) // factor) * factor
    return h, w


def patchify(frames: np.ndarray, size: tuple[int, int], patch: int = 14, merge: int = 2, temporal: int = 2
             ) -> tuple[torch.Tensor, list[int]]:
    """(T, H, W, 3) uint8 frames -> (t*h*w, 3*temporal*patch*patch) float patch rows and the grid [t, h, w].

    Frames are resized to `size`, normalised with CLIP's mean/std, padded to a multiple of `temporal` by
    repeating the last frame, and cut into patches in the merger's order (t, h/merge, w/merge, merge, merge).
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise InputError(f"frames must be a (T, H, W, 3) uint8 array, got {frames.dtype} {frames.shape}")
    if frames.shape[0] == 0:
        raise InputError("a video needs at least one frame")
    hh, ww = size
    x = np.stack([np.asarray(Image.fromarray(f).resize((ww, hh), Image.BICUBIC)) for f in frames])
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    if pad := -x.shape[0] % temporal:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
    t, gh, gw = x.shape[0] // temporal, hh // patch, ww // patch
    x = x.view(t, temporal, 3, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * gh * gw, 3 * temporal * patch * patch), [t, gh, gw]


def qwen_inputs(model, tokenizer, texts: list[str], images: list | None = None, videos: list | None = None,
                min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280) -> dict[str, torch.Tensor]:
    """Model inputs for prompts whose "<image>" / "<video>" markers stand for the media, one list per prompt.

    Args:
        texts: one prompt per sample, e.g. "<|im_start|>user\\n<image>What is it?<|im_end|>\\n<|im_start|>assistant\\n".
        images: per prompt, its PIL images in order (or None for none).
        videos: per prompt, its (T, H, W, 3) uint8 frame arrays in order (or None for none).
    """
    cfg = model.config
    m, p = cfg.vision_config.spatial_merge_size, cfg.vision_config.patch_size
    media = {"<image>": images, "<video>": videos}
    rows = {"<image>": [], "<video>": []}
    grids = {"<image>": [], "<video>": []}
    expanded = []
    for i, text in enumerate(texts):
        for marker, items in media.items():
            mine = list(items[i]) if items is not None and items[i] is not None else []
            if text.count(marker) != len(mine):
                raise InputError(f"prompt {i} has {text.count(marker)} {marker} markers for {len(mine)} of them")
            pad = "<|image_pad|>" if marker == "<image>" else "<|video_pad|>"
            for item in mine:
                arr = np.asarray(item.convert("RGB"))[None] if marker == "<image>" else item
                size = smart_size(*arr.shape[1:3], factor=p * m, min_pixels=min_pixels, max_pixels=max_pixels)
                x, grid = patchify(arr, size, p, m, cfg.vision_config.temporal_patch_size)
                rows[marker].append(x)
                grids[marker].append(grid)
                n = grid[0] * grid[1] * grid[2] // (m * m)
                text = text.replace(marker, "<|vision_start|>" + pad * n + "<|vision_end|>", 1)
        expanded.append(text)
    enc = tokenizer(expanded, padding=True, return_tensors="pt")
    ids = enc["input_ids"]
    out = {"input_ids": ids, "attention_mask": enc["attention_mask"],
           "mm_token_type_ids": (ids == cfg.image_token_id).long() + 2 * (ids == cfg.video_token_id).long()}
    if rows["<image>"]:
        out.update(pixel_values=torch.cat(rows["<image>"]), image_grid_thw=torch.tensor(grids["<image>"]))
    if rows["<video>"]:
        out.update(pixel_values_videos=torch.cat(rows["<video>"]), video_grid_thw=torch.tensor(grids["<video>"]))
    return out
