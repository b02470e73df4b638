"""The small default models: word-level tokenizer, architectures, input preprocessing, loading.

- Image model: `LlavaForConditionalGeneration`, a CLIP vision tower (with CLS, so HiRED and MustDrop apply) at
  168 px / patch 14 (12x12 = 144 visual tokens) and a Llama decoder.
- Video model: `LlavaOnevisionForConditionalGeneration`, a SigLIP tower at 168 px / patch 14 (12x12 per frame,
  pooled 2x2 by the model to 6x6 = 36 tokens per frame, one newline token after the last frame) and a Qwen2
  decoder; 8 frames sampled uniformly (lmms-eval's rule): 289 visual tokens.

The tokenizer is word-level over the closed vocabulary of the synthetic benchmark's questions, options and the
protocol templates (`protocols`): a word keeps its leading space (" red" and "red" are two tokens) and the
decoder concatenates tokens, so decoding reproduces the text exactly. Saved as tokenizer.json, it loads with
`AutoTokenizer.from_pretrained` as a `PreTrainedTokenizerFast`.

`default_model(kind)` loads a shipped checkpoint from `tokenreduce/assets/models/<kind>/` (never a download).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import protocols

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<video>"]
#: a word with its leading space, one punctuation mark (with its leading space) or a newline
WORD_REGEX = r" ?[A-Za-z0-9_']+| ?[^A-Za-z0-9_'\s]|\n"
IMAGE_SIZE = 168
PATCH_SIZE = 14
NUM_FRAMES = 8
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
KINDS = ("image", "video")
#: keys of a checkpoint's `training.json` that `tokenreduce run` reads to tell users what the model can answer
#: (`train.py` writes them; keep them when a shipped model is replaced):
#: "prompt_forms": the prompt forms it was trained on, protocol names (`protocols.PROTOCOLS`, multiple choice)
#: and "open" (`protocols.open_prompt`: the question without options, answered in a few words);
#: "vocabulary": "closed" when the tokenizer knows only the benchmark's words (others become <unk>).
PROMPT_FORMS_KEY = "prompt_forms"
VOCABULARY_KEY = "vocabulary"


def model_dir(kind: str) -> Path:
    """Folder of the shipped `kind` model inside the installed package."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return Path(str(resources.files("tokenreduce") / "assets" / "models" / kind))


# --- tokenizer ----------------------------------------------------------------------------------------------------


def vocabulary_texts(n_images: int = 600, n_videos: int = 300) -> list[str]:
    """Every text the models see: prompts of every protocol and targets, over generated train items."""
    from . import synthetic as syn

    texts = []
    for s in syn.generate_images(n_images, seed=0, split="train"):
        q = s.question
        texts += [protocols.build_prompt(p, q.question, q.options, "image") for p in protocols.PROTOCOLS]
        texts += [s.caption, protocols.open_prompt(q.question, "image"), " " + " ".join(q.options)]
    for v in syn.generate_videos(n_videos, seed=0, split="train", render=False):
        q = v.question
        texts += [protocols.build_prompt(p, q.question, q.options, "video") for p in protocols.PROTOCOLS]
        texts += [protocols.open_prompt(q.question, "video"), " " + " ".join(q.options)]
    from tokenreduce.prune.quota import FRAME_PROMPT  # QuoTA's frame scorer asks the model itself

    texts += [FRAME_PROMPT.format(query="x"), " yes Yes no No yes"]
    words = list(syn.COLOURS) + list(syn.SHAPES) + list(syn.DIRECTIONS) + [str(i) for i in range(10)]
    texts += [" ".join(words), " " + " ".join(words)]
    for letter in protocols.LETTERS:
        texts += [protocols.target(p, letter) for p in protocols.PROTOCOLS] + [f"({letter})", f"{letter}."]
    return texts


def build_tokenizer(texts: Iterable[str] | None = None):
    """A word-level `PreTrainedTokenizerFast` over the words of `texts` (default `vocabulary_texts()`)."""
    import re

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pattern = re.compile(WORD_REGEX)
    words: dict[str, None] = {}
    for text in texts if texts is not None else vocabulary_texts():
        for piece in re.split(r"(<image>|<video>)", text):
            if piece not in ("<image>", "<video>"):
                words.update(dict.fromkeys(pattern.findall(piece)))
    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for w in sorted({" ", *words}):  # a lone space precedes a placeholder
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(WORD_REGEX), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        clean_up_tokenization_spaces=False, padding_side="left",
    )
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    tok.padding_side = "left"
    tok.chat_template = protocols.CHAT_TEMPLATE
    return tok


# --- architectures --------------------------------------------------------------------------------------------------

#: widths of the two models (small enough to train on 2 CPU cores in under an hour)
IMAGE_VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                    image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=128)
VIDEO_VISION = dict(hidden_size=96, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                    image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
TEXT = dict(hidden_size=192, intermediate_size=576, num_hidden_layers=6, num_attention_heads=6,
            num_key_value_heads=6, max_position_embeddings=1024, tie_word_embeddings=True)


def build_model(kind: str, tokenizer, seed: int = 0, vision: dict | None = None, text: dict | None = None):
    """A fresh (random) image or video model sized for `tokenizer`'s vocabulary."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tkw = dict(TEXT, **(text or {}))
    tkw.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    ids = dict(image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    if kind == "image":
        cfg = LlavaConfig(vision_config=CLIPVisionConfig(**dict(IMAGE_VISION, **(vision or {}))),
                          text_config=LlamaConfig(**tkw), vision_feature_layer=-1,
                          vision_feature_select_strategy="default", tie_word_embeddings=True, **ids)
        model = LlavaForConditionalGeneration(cfg)
    elif kind == "video":
        cfg = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**dict(VIDEO_VISION, **(vision or {}))),
                                   text_config=Qwen2Config(**tkw), vision_feature_layer=-1,
                                   vision_feature_select_strategy="full", tie_word_embeddings=True,
                                   video_token_id=tokenizer.convert_tokens_to_ids("<video>"), **ids)
        model = LlavaOnevisionForConditionalGeneration(cfg)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


# --- inputs -----------------------------------------------------------------------------------------------------


def normalise(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(..., H, W, 3) uint8 at the tower size -> (..., 3, H, W) float32, scaled to [0, 1] then normalised."""
    x = torch.from_numpy(np.array(images, dtype=np.float32)).div_(255.0)
    x = x.movedim(-1, -3)
    shape = (3, 1, 1)
    return (x - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """(..., H, W, 3) uint8 -> (..., size, size, 3), bicubic (PIL), as the processors do; no-op at that size."""
    if images.shape[-3:-1] == (size, size):
        return images
    from PIL import Image

    flat = images.reshape(-1, *images.shape[-3:])
    out = np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC)) for f in flat])
    return out.reshape(*images.shape[:-3], size, size, 3)


def image_pixel_values(images: np.ndarray, size: int = IMAGE_SIZE) -> Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, size, size) CLIP-normalised pixel values (default 168)."""
    return normalise(resize(images, size), CLIP_MEAN, CLIP_STD)


def video_pixel_values(videos: np.ndarray, size: int = IMAGE_SIZE) -> Tensor:
    """(B, T, H, W, 3) uint8 -> (B, T, 3, size, size) SigLIP-normalised pixel values (default 168)."""
    return normalise(resize(videos, size), SIGLIP_MEAN, SIGLIP_STD)


def visual_token_count(model, num_frames: int = NUM_FRAMES) -> int:
    """Placeholders one image (image model) or one `num_frames` video (video model) expands to."""
    vc = model.config.vision_config
    side = vc.image_size // vc.patch_size
    if model.config.model_type == "llava_onevision":
        q = -(-side // 2)
        return num_frames * q * q + 1
    return side * side


def encode(tokenizer, model, prompts: Sequence[str], visuals: np.ndarray, targets: Sequence[str] | None = None,
           n_visual: int | None = None) -> dict[str, Tensor]:
    """Model inputs for prompts with one placeholder each and their images (B, H, W, 3) or videos (B, T, H, W, 3).

    With `targets`, each target (+ eos) is appended and `labels` marks only the target positions (-100
    elsewhere); sequences are right-padded then. Without, the batch is left-padded for generation.
    `n_visual` overrides how many placeholders the visual expands to (training feeds reduced visual tokens).
    """
    video = model.config.model_type == "llava_onevision"
    n = n_visual if n_visual is not None else visual_token_count(model, visuals.shape[1] if video else NUM_FRAMES)
    token = "<video>" if video else "<image>"
    ids, labels = [], []
    for i, p in enumerate(prompts):
        p_ids = tokenizer(p.replace(token, token * n), add_special_tokens=False)["input_ids"]
        t_ids = [] if targets is None else tokenizer(targets[i], add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id]
        ids.append(p_ids + t_ids)
        labels.append([-100] * len(p_ids) + t_ids)
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    lab = torch.full((len(ids), width), -100, dtype=torch.long)
    for i, (x, y) in enumerate(zip(ids, labels)):
        sl = slice(0, len(x)) if targets is not None else slice(width - len(x), width)
        input_ids[i, sl] = torch.tensor(x)
        mask[i, sl] = 1
        lab[i, sl] = torch.tensor(y)
    out = {"input_ids": input_ids, "attention_mask": mask}
    if video:
        out["pixel_values_videos"] = video_pixel_values(visuals, model.config.vision_config.image_size)
    else:
        out["pixel_values"] = image_pixel_values(visuals, model.config.vision_config.image_size)
    if targets is not None:
        out["labels"] = lab
    return out


def load(path: str | Path, kind: str | None = None):
    """(model, tokenizer) from a checkpoint folder, with stock `from_pretrained` (local files only)."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    name = "LlavaOnevision" if cfg.model_type == "llava_onevision" else "Llava"
    cls = getattr(transformers, f"{name}ForConditionalGeneration")
    model = cls.from_pretrained(path, local_files_only=True, dtype=torch.float32, attn_implementation="sdpa").eval()
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    tok.padding_side = "left"
    return model, tok


def default_model(kind: str = "image"):
    """The shipped default `kind` ("image" or "video") model and its tokenizer: (model, tokenizer)."""
    path = model_dir(kind)
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"no shipped {kind} model at {path}")
    return load(path, kind)


def build_image_processor(tokenizer, size: int = IMAGE_SIZE):
    """A `LlavaProcessor` for the image model (PIL CLIP image processor at `size` px, 168 by default: `<image>`
    -> 144 placeholders); saved beside the image model so `AutoProcessor.from_pretrained` works too. Gives the
    same inputs as `encode`."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    crop = {"height": size, "width": size}
    ip = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size=crop, image_mean=list(CLIP_MEAN),
                               image_std=list(CLIP_STD))
    return LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=protocols.CHAT_TEMPLATE)


def export(run_dir: str | Path, kind: str, dest: str | Path | None = None) -> Path:
    """Copy a trained checkpoint (`train.py`'s OUT/best) into the package (`model_dir(kind)`), re-saved with
    `save_pretrained` (safetensors, float32), with its tokenizer (and processor for the image model)."""
    import shutil

    dest = Path(dest) if dest is not None else model_dir(kind)
    model, tok = load(run_dir)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if kind == "image":
        build_image_processor(tok, model.config.vision_config.image_size).save_pretrained(tmp)
    if (Path(run_dir) / "training.json").exists():
        shutil.copy(Path(run_dir) / "training.json", tmp / "training.json")
    if (dest / "README.md").exists():
        shutil.copy(dest / "README.md", tmp / "README.md")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest
