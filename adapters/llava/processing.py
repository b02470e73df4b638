"""Offline processors: a byte-level tokenizer and a `LlavaProcessor` built without any download."""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlavaProcessor, PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<video>"]

#: a plain LLaVA-1.5 (vicuna_v1) style chat template
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %} {% else %}ASSISTANT: "
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@functools.lru_cache(maxsize=1)
def _byte_tokenizer_object() -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (262 ids: 6 specials + 256 bytes); any text round-trips, no download."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_byte_tokenizer_object(),
        pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    tok.padding_side = "left"
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_processor(image_size: int, patch_size: int) -> LlavaProcessor:
    """A `LlavaProcessor` whose `<image>` expands to (image_size // patch_size)**2 placeholders."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ip = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                               crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(
        image_processor=ip, tokenizer=byte_tokenizer(), patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def anyres_pinpoints(image_size: int, max_crops: int = 4) -> list[list[int]]:
    """LLaVA-1.6's anyres resolutions for a tower input of `image_size` (1x2, 2x1, 2x2, 1x3, 3x1 tiles)."""
    s = image_size
    points = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]]
    return [p for p in points if (p[0] // s) * (p[1] // s) <= max_crops]


def build_next_processor(image_size: int, patch_size: int, pinpoints: list[list[int]] | None = None):
    """A `LlavaNextProcessor` (PIL image processor, byte tokenizer) for an anyres model of this tower size."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    ip = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints or anyres_pinpoints(image_size),
    )
    return LlavaNextProcessor(
        image_processor=ip, tokenizer=byte_tokenizer(), patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )


def preset_kwargs(vision: dict, text: dict, llm_layers: int | None, vision_layers: int | None
                  ) -> tuple[dict, dict, PreTrainedTokenizerFast]:
    """Copies of a preset's vision and text config kwargs with the layer overrides and the byte
    tokenizer's vocabulary and special ids filled in; and that tokenizer."""
    vkw, tkw = dict(vision), dict(text)
    if llm_layers is not None:
        tkw["num_hidden_layers"] = llm_layers
    if vision_layers is not None:
        vkw["num_hidden_layers"] = vision_layers
    tok = byte_tokenizer()
    tkw.update(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id)
    return vkw, tkw, tok
