"""Oracles (DESIGN.md section 5) for the video adapters: Video-LLaVA, LLaVA-OneVision, LLaVA-NeXT-Video."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matrix import case, names
from tokenreduce.adapters.videollm import video_inputs
from tokenreduce.adapters.videollm.zoo import build_video_llm

import tokenreduce as tr
from tokenreduce.plan import Stage
from tokenreduce.registry import adapter_for

PRESETS = ["tiny-video-llava", "tiny-onevision", "tiny-next-video"]
#: every registered VISUAL reducer (the first three run in `-m "not slow"`, the rest in CI)
REDUCERS = names(Stage.VISUAL, fast=("aim-merge", "random", "pool"))
PROMPTS = ["USER: <video>\nWhat happens in the video? ASSISTANT:", "USER: <video>\nColour? ASSISTANT:"]


@pytest.fixture(scope="module")
def zoo():
    return {(p, a): build_video_llm(p, seed=0, attn=a) for p in PRESETS for a in ("sdpa", "eager")}


def clips(n: int, frames: int = 4, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (frames, 4, 4, 3), dtype=np.uint8)
        out.append(np.repeat(np.repeat(small, 16, axis=1), 20, axis=2))  # (T, 64, 80, 3) blocky frames
    return out


def make_inputs(model, tok, n=1, frames=4, seed=0):
    spec = adapter_for(model)(model).video_spec()
    return video_inputs(tok, spec, PROMPTS[:n], clips(n, frames, seed))


def run(model, x, plan):
    with torch.no_grad(), tr.apply(model, plan) as h:
        logits = model(**x).logits
        tokens = model.generate(**x, max_new_tokens=4, do_sample=False)
    return logits, tokens, h.report.calls[0]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("plan", ["none", "aim-merge(keep=1.0)", "pool(keep=1.0)", "random(keep=1.0)"])
def test_noop_identity(zoo, preset, attn, plan):
    model, tok = zoo[preset, attn]
    x = make_inputs(model, tok)
    with torch.no_grad():
        ref, ref_tokens = model(**x).logits, model.generate(**x, max_new_tokens=4, do_sample=False)
    out, tokens, _ = run(model, x, plan)
    assert torch.equal(out, ref)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("preset", PRESETS)
def test_explicit_equivalence(zoo, preset):
    """A kept index set gives the logits of the vanilla LLM on inputs_embeds of exactly those tokens."""
    model, tok = zoo[preset, "sdpa"]
    x = make_inputs(model, tok)
    out, _, call = run(model, x, "random(keep=0.3)")
    ids = x["input_ids"][0]
    with torch.no_grad():
        stock = model.model.get_video_features(pixel_values_videos=x["pixel_values_videos"]).pooler_output
    # every video token of the stock sequence, in order (transformers < 5.21 gives LLaVA-NeXT-Video's per video)
    stock = torch.cat([f.reshape(-1, f.shape[-1]) for f in (stock if isinstance(stock, (list, tuple)) else [stock])])
    kept = call.positions[0]
    is_ph = ids == model.config.video_token_id
    rank = torch.cumsum(is_ph.long(), 0) - 1
    embeds = model.get_input_embeddings()(ids[kept]).clone()
    vis = is_ph[kept]
    embeds[vis] = stock[rank[kept[vis]]]
    with torch.no_grad():
        ref = model(inputs_embeds=embeds[None]).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", REDUCERS)
def test_batch_equals_each_sample_alone(zoo, preset, name):
    model, tok = zoo[preset, "sdpa"]
    if case(name).cls and not adapter_for(model)(model).has_cls():
        pytest.skip(f"{name} needs a CLS token; {preset}'s tower has none (refusal tested below)")
    xb = make_inputs(model, tok, n=2)
    plan = case(name).plan(0.25)
    out_b, gen_b, call_b = run(model, xb, plan)
    width = xb["input_ids"].shape[1]
    spec = adapter_for(model)(model).video_spec()
    for b in range(2):
        x1 = video_inputs(tok, spec, [PROMPTS[b]], [clips(2)[b]])
        out_1, gen_1, call_1 = run(model, x1, plan)
        assert call_b.tokens()[b] == call_1.tokens()[0]
        n = call_1.seq_llm[0]
        torch.testing.assert_close(out_b[b, -n:], out_1[0], atol=1e-4, rtol=1e-4)
        new_1 = gen_1[0, x1["input_ids"].shape[1]:]
        assert torch.equal(gen_b[b, width:width + new_1.numel()], new_1)


@pytest.mark.parametrize("preset", PRESETS)
def test_same_kept_set_under_sdpa_and_eager(zoo, preset):
    calls = [run(zoo[preset, a][0], make_inputs(*zoo[preset, a]), "aim-merge(keep=0.25)")[2] for a in ("sdpa", "eager")]
    assert torch.equal(calls[0].visual[0].source, calls[1].visual[0].source)


@pytest.mark.parametrize("preset", PRESETS)
def test_tokens_record_their_frame(zoo, preset):
    model, tok = zoo[preset, "sdpa"]
    _, _, call = run(model, make_inputs(model, tok, frames=6), "pool(keep=0.25)")
    v = call.visual[0]
    assert [it.kind for it in v.items] == ["frame"] * 6
    assert [it.index for it in v.items] == list(range(6))
    assert torch.equal(torch.bincount(v.item, minlength=6), torch.full((6,), len(v) // 6))
    assert bool((v.position[1:] > v.position[:-1]).all())  # frames in order, tokens in order


def test_aim_merge_twice_gives_the_video_schedule(zoo):
    """AIM on LLaVA-OneVision: 196 -> 98 -> 49 per frame; here the tiny 4x4 = 16 -> 8 -> 4."""
    model, tok = zoo["tiny-onevision", "sdpa"]
    _, _, call = run(model, make_inputs(model, tok), "aim-merge(keep=0.5)+aim-merge(keep=0.5)")
    assert call.tokens("input") == [64]
    assert [c for _, c in call.stages] == [[64], [32], [16]]
    assert torch.equal(torch.bincount(call.visual[0].item, minlength=4), torch.full((4,), 4))
    assert call.extra_tokens == [1]  # the newline after the last frame


def test_aim_merge_across_frames(zoo):
    """frames=2 merges pairs of adjacent frames together; the pair's budget is the sum of its frames'."""
    model, tok = zoo["tiny-onevision", "sdpa"]
    x = make_inputs(model, tok)
    x["pixel_values_videos"][:, 1] = x["pixel_values_videos"][:, 0]  # frames 0 and 1 identical
    _, _, call = run(model, x, "aim-merge(keep=0.5, frames=2)")
    v = call.visual[0]
    assert len(v) == 32
    # identical frames merge into each other: frame 1 tokens end up in tokens represented by frame 0
    members_of_frame1 = v.source[16:32]
    assert bool((v.item[members_of_frame1] == 0).any())


def test_video_llava_frame_cls_follows_its_frame(zoo):
    """Video-LLaVA: a frame's CLS token enters the LLM iff a token of that frame survives."""
    model, tok = zoo["tiny-video-llava", "sdpa"]
    x = make_inputs(model, tok)
    _, _, full = run(model, x, "none")
    _, _, red = run(model, x, "random(tokens=2)")
    frames_left = len(set(red.visual[0].item.tolist()))
    assert full.extra_tokens == [4]
    assert red.extra_tokens == [frames_left]


def _ov_images(model, tok, sizes, texts=None):
    from PIL import Image

    texts = texts or ["USER: <image>\nWhat is there? ASSISTANT:"] * len(sizes)
    rng = np.random.default_rng(1)
    imgs = [Image.fromarray(np.repeat(np.repeat(rng.integers(0, 256, (h // 20 + 1, w // 20 + 1, 3), dtype=np.uint8),
                                                20, 0), 20, 1)[:h, :w]) for w, h in sizes]
    return adapter_for(model)(model).image_inputs(tok, texts, imgs)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("size", [(120, 100), (500, 300), (900, 700)])
def test_onevision_images_noop_identity(zoo, attn, size):
    """anyres_max images, including one whose mosaic the model shrinks by interpolation (900x700)."""
    model, tok = zoo["tiny-onevision", attn]
    x = _ov_images(model, tok, [size])
    with torch.no_grad():
        ref, ref_tokens = model(**x).logits, model.generate(**x, max_new_tokens=4, do_sample=False)
    out, tokens, call = run(model, x, "none")
    assert torch.equal(out, ref) and torch.equal(tokens, ref_tokens)
    assert call.extra_tokens[0] > 0  # the row newlines


@pytest.mark.parametrize("name", REDUCERS)
def test_onevision_images_batch_equals_each_alone(zoo, name):
    model, tok = zoo["tiny-onevision", "sdpa"]
    if case(name).cls:
        pytest.skip(f"{name} needs a CLS token; SigLIP has none (refusal tested in test_every_visual_reducer...)")
    plan = case(name).plan(0.25)
    sizes = [(500, 300), (900, 700)]
    texts = ["USER: <image>\nWhat is there? ASSISTANT:", "USER: <image>\nColour? ASSISTANT:"]
    xb = _ov_images(model, tok, sizes, texts)
    out_b, gen_b, call_b = run(model, xb, plan)
    for b in range(2):
        x1 = _ov_images(model, tok, sizes[b:b + 1], texts[b:b + 1])
        # same image content: regenerate with the same seed order by building the pair and slicing
        x1["pixel_values"] = xb["pixel_values"][b:b + 1, : x1["pixel_values"].shape[1]]
        out_1, gen_1, call_1 = run(model, x1, plan)
        assert call_b.tokens()[b] == call_1.tokens()[0]
        n = call_1.seq_llm[0]
        torch.testing.assert_close(out_b[b, -n:], out_1[0], atol=1e-4, rtol=1e-4)


def test_onevision_large_image_refuses_tower_changes(zoo):
    model, tok = zoo["tiny-onevision", "sdpa"]
    x = _ov_images(model, tok, [(900, 700)])
    with tr.apply(model, "mustdrop-vision(threshold=-1.0, key_ratio=0)"), pytest.raises(tr.InputError, match="pools"):
        model(**x)


def test_mixed_images_and_videos_are_refused(zoo):
    model, tok = zoo["tiny-video-llava", "sdpa"]
    x = make_inputs(model, tok)
    with tr.apply(model, "pool(keep=0.5)"), pytest.raises(tr.InputError, match="not both"):
        model(**x, pixel_values=torch.zeros(1, 3, 112, 112))


def test_video_inputs_validate(zoo):
    model, tok = zoo["tiny-onevision", "sdpa"]
    spec = adapter_for(model)(model).video_spec()
    with pytest.raises(tr.InputError, match="exactly once"):
        video_inputs(tok, spec, ["no placeholder"], clips(1))
    with pytest.raises(tr.InputError, match="same number of frames"):
        video_inputs(tok, spec, PROMPTS, [clips(1, 4)[0], clips(1, 5)[0]])
    with pytest.raises(tr.InputError, match="uint8"):
        video_inputs(tok, spec, PROMPTS[:1], [clips(1)[0].astype(np.float32)])


@pytest.mark.parametrize("preset", PRESETS)
def test_every_visual_reducer_from_a_video_file(zoo, preset, tmp_path):
    """A real mp4 written with PyAV, decoded, sampled uniformly and reduced by every VISUAL reducer in generate."""
    from tokenreduce.video import load_video, write_video

    model, tok = zoo[preset, "sdpa"]
    path = tmp_path / "clip.mp4"
    write_video(path, np.concatenate(clips(1, frames=24)), fps=8)
    frames = load_video(path, num_frames=4)
    x = video_inputs(tok, adapter_for(model)(model).video_spec(), PROMPTS[:1], [frames.frames])
    plans = [(n, case(n).plan(0.25)) for n in names(Stage.VISUAL)] + [("quota", "quota(keep=0.25)")]  # + vlm scorer
    for name, plan in plans:
        if case(name).cls and preset == "tiny-onevision":  # SigLIP: no CLS token to score with
            with pytest.raises(tr.UnsupportedModelError, match="CLS"):
                tr.attach(model, plan)
            continue
        with torch.no_grad(), tr.apply(model, plan, tokenizer=tok) as h:
            out = model.generate(**x, max_new_tokens=2, do_sample=False)
        assert out.shape[1] > x["input_ids"].shape[1]
        call = h.report.last
        assert 0 < call.tokens()[0] <= round(0.25 * call.tokens("input")[0])


def test_pooling_video_models_refuse_tower_changes(zoo):
    """A model that pools every frame's full grid cannot take an ENCODER reducer that changes it: it says so."""
    model, tok = zoo["tiny-next-video", "sdpa"]
    x = make_inputs(model, tok)
    with tr.apply(model, "mustdrop-vision(threshold=-1.0)"), pytest.raises(tr.InputError, match="pools"):
        model(**x)
