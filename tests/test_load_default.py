"""`tr.load_default(kind)`: the shipped models with a processor that gives exactly the inputs they were trained on
(`tokenreduce.eval.models.encode`, the main job's path), so answers match the main job's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tokenreduce.eval import evaluate as E
from tokenreduce.eval import models as M
from tokenreduce.eval import protocols as P
from tokenreduce.eval import synthetic as syn

import tokenreduce as tr


@pytest.fixture(scope="module")
def video():
    return tr.load_default("video")


@pytest.fixture(scope="module")
def image():
    return tr.load_default("image")


def test_video_processor_gives_the_training_inputs_and_the_main_jobs_answers(video):
    model, processor = video
    assert type(model).__name__ == "LlavaOnevisionForConditionalGeneration" and not model.training
    items, visuals = E.items_from_samples(syn.generate_videos(4, seed=0, split="test"), "videomme")
    for item, frames in zip(items, visuals):
        prompt = P.build_prompt(item.protocol, item.question, item.options, item.kind)
        ours = processor(text=prompt, videos=frames)
        ref = M.encode(processor.tokenizer, model, [prompt], frames[None])
        assert set(ours) == set(ref)
        for k in ref:
            assert torch.equal(ours[k], ref[k]), k
        # a list of PIL images is the same video
        pil = processor(text=prompt, videos=[Image.fromarray(f) for f in frames])
        assert torch.equal(pil["pixel_values_videos"], ref["pixel_values_videos"])
        out = model.generate(**ours, max_new_tokens=4, do_sample=False)
        text = processor.batch_decode(out[:, ours["input_ids"].shape[1]:])[0]
        assert text == E.answer(model, processor.tokenizer, item, frames)["completion"]


def test_video_processor_batches_and_left_pads(video):
    model, processor = video
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (3, 40, 50, 3), dtype=np.uint8) for _ in range(2))
    out = processor(text=["USER: <video>\nWhich? ASSISTANT:", "USER: <video>\nWhich colour is it? ASSISTANT:"],
                    videos=[a, b])
    assert out["pixel_values_videos"].shape == (2, 3, 3, 168, 168)  # the tower's size: 12 x 12 patches
    assert out["attention_mask"][0, 0] == 0 and out["attention_mask"][1].all()  # left padding
    n_video = (out["input_ids"] == model.config.video_token_id).sum(1)
    assert n_video.tolist() == [3 * 36 + 1] * 2  # pooled 2 x 2 to 6 x 6 a frame, one newline


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 8, 8, 3), dtype=np.float32), "uint8"),
    (np.zeros((2, 8, 8), dtype=np.uint8), r"\(T, H, W, 3\)"),
    ([], "empty"),
    ("clip.mp4", "expected"),
    ([np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)], "different sizes"),
])
def test_bad_frames_get_a_clear_error(video, bad, match):
    _, processor = video
    with pytest.raises(tr.InputError, match=match):
        processor(text="USER: <video>\n? ASSISTANT:", videos=bad)


def test_prompts_and_videos_must_pair_up(video):
    _, processor = video
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(tr.InputError, match="one per prompt"):
        processor(text=["<video> a", "<video> b"], videos=frames)
    with pytest.raises(tr.InputError, match="exactly once"):
        processor(text="no placeholder", videos=frames)


def test_image_model_and_its_processor(image):
    model, processor = image
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    items, visuals = E.items_from_samples(syn.generate_images(2, seed=0, split="test"), "images")
    for item, img in zip(items, visuals):
        prompt = P.build_prompt(item.protocol, item.question, item.options, item.kind)
        ours = processor(text=prompt, images=Image.fromarray(img), return_tensors="pt")
        ref = M.encode(processor.tokenizer, model, [prompt], img[None])
        assert torch.equal(ours["input_ids"], ref["input_ids"])
        assert torch.allclose(ours["pixel_values"], ref["pixel_values"], atol=1e-5)


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(tr.InputError, match="kind must be one of image, video"):
        tr.load_default("audio")
    with pytest.raises(tr.InputError, match="attn_implementation"):
        tr.load_default("video", attn_implementation="flash")
