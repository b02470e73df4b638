"""`load_default(kind)`: the shipped default image or video model and its processor, in one call.

    import tokenreduce as tr
    model, processor = tr.load_default("video")
    inputs = processor(text="USER: <video>\\nWhat happens? ASSISTANT:", videos=frames)   # frames: (T, H, W, 3) uint8
    out = model.generate(**inputs, max_new_tokens=4)
    print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:]))

Both models are stock transformers classes loaded with `from_pretrained` from `tokenreduce/assets/models/<kind>/`
(nothing is downloaded). The image model comes with its saved `LlavaProcessor` (`AutoProcessor`). transformers'
video processors need torchvision, which cannot sit beside the CPU torch used here, so the video model comes
with `VideoProcessor`: the same call shape (`processor(text=..., videos=...)`), built on the adapter's
`VideoSpec` (resize, normalise, one placeholder per visual token), giving exactly the inputs the model was
trained on. Both default models answer multiple-choice questions in the benchmarks' forms
(`tokenreduce.eval.protocols.build_prompt`), not free-form ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .errors import InputError

KINDS = ("image", "video")


def frame_array(frames: Any, what: str = "frames") -> np.ndarray:
    """Frames as one (T, H, W, 3) uint8 array.

    Accepts a (T, H, W, 3) or (H, W, 3) uint8 array (one frame), a list of PIL images or (H, W, 3) arrays of
    one size, or a `tokenreduce.video.Frames`. Anything else raises `InputError` naming `what`.
    """
    if hasattr(frames, "frames") and hasattr(frames, "indices"):  # tokenreduce.video.Frames
        frames = frames.frames
    if isinstance(frames, np.ndarray):
        arr = frames
    elif isinstance(frames, (list, tuple)):
        if not frames:
            raise InputError(f"{what}: an empty list of frames")
        arrs = []
        for i, f in enumerate(frames):
            if hasattr(f, "convert") and hasattr(f, "size"):  # a PIL image
                f = np.asarray(f.convert("RGB"))
            if not isinstance(f, np.ndarray):
                raise InputError(f"{what}[{i}]: expected a PIL image or an (H, W, 3) uint8 array, got "
                                 f"{type(f).__name__}")
            arrs.append(f)
        shapes = {a.shape for a in arrs}
        if len(shapes) != 1:
            raise InputError(f"{what}: frames of different sizes {sorted(shapes)}; give frames of one size")
        arr = np.stack(arrs)
    else:
        raise InputError(f"{what}: expected a (T, H, W, 3) uint8 array or a list of PIL images, got "
                         f"{type(frames).__name__}")
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or 0 in arr.shape:
        raise InputError(f"{what}: expected (T, H, W, 3) uint8 RGB frames, got {arr.dtype} {tuple(arr.shape)}")
    return arr


class VideoProcessor:
    """Builds a video LLM's inputs from prompts and frames, as its transformers processor would.

    `processor(text=..., videos=...)` takes one prompt and one video, or a list of prompts and a list of
    videos, one per prompt; each prompt holds the video token once (``"<video>"``), a video is any form
    `frame_array` accepts, and a batch needs equal frame counts. Returns ``input_ids`` and ``attention_mask``
    (B, L), left-padded, and ``pixel_values_videos`` (B, T, 3, S, S). Without videos it tokenizes text only.
    `decode`/`batch_decode` are the tokenizer's (special tokens skipped).

    Attributes:
        tokenizer: the model's tokenizer.
        spec: the adapter's `VideoSpec` (frame size, normalisation, placeholders per video).
    """

    def __init__(self, tokenizer, spec):
        self.tokenizer = tokenizer
        self.spec = spec

    @property
    def video_token(self) -> str:
        return self.spec.token

    def __call__(self, text: str | Sequence[str], videos: Any = None, return_tensors: str = "pt",
                 **kwargs: Any) -> dict[str, Tensor]:
        from .adapters.videollm.common import video_inputs

        if return_tensors != "pt":
            raise InputError(f"return_tensors={return_tensors!r}: only 'pt' is supported")
        if kwargs:
            raise InputError(f"VideoProcessor: unsupported argument(s) {', '.join(sorted(kwargs))}")
        texts = [text] if isinstance(text, str) else list(text)
        if videos is None:
            return dict(self.tokenizer(texts, padding=True, return_tensors="pt"))
        if isinstance(text, str):  # one prompt, one video
            vids = [videos]
        elif isinstance(videos, (list, tuple)) and len(videos) == len(texts):
            vids = list(videos)
        else:
            raise InputError(f"{len(texts)} prompts need a list of {len(texts)} videos, one per prompt")
        arrays = [frame_array(v, f"videos[{i}]") for i, v in enumerate(vids)]
        return video_inputs(self.tokenizer, self.spec, texts, arrays)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        kwargs.setdefault("skip_special_tokens", True)
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        kwargs.setdefault("skip_special_tokens", True)
        return self.tokenizer.batch_decode(*args, **kwargs)


def load_default(kind: str = "video", attn_implementation: str = "sdpa") -> tuple[nn.Module, Any]:
    """(model, processor) of the shipped default `kind` model ("image" or "video"), in eval mode, float32.

    "image": `LlavaForConditionalGeneration` (CLIP 3x128 + Llama 6x192, 64 tokens per 112 px image) with its
    `LlavaProcessor`. "video": `LlavaOnevisionForConditionalGeneration` (SigLIP 2x96 + Qwen2 6x192, 16 tokens per
    frame after 2x2 pooling, a newline after the last frame) with a `VideoProcessor`. Loaded from the package,
    never downloaded.
    """
    if kind not in KINDS:
        raise InputError(f"load_default: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if attn_implementation not in ("sdpa", "eager"):
        raise InputError(f"load_default: attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}")
    import transformers

    from .eval.models import model_dir
    from .registry import adapter_for

    path = model_dir(kind)
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"no shipped {kind} model at {path} (is the package installed with its assets?)")
    cls = transformers.LlavaForConditionalGeneration if kind == "image" else \
        transformers.LlavaOnevisionForConditionalGeneration
    model = cls.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                attn_implementation=attn_implementation).eval()
    if kind == "image":
        processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
        processor.tokenizer.padding_side = "left"
        return model, processor
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "left"
    return model, VideoProcessor(tokenizer, adapter_for(model)(model).video_spec())
