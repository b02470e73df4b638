"""QuoTA's open_clip frame scorer (`ClipScorer.open_clip`), with a tiny open_clip model trained in the test.

open_clip is the optional `clip` extra and needs torchvision, which only works here with torch 2.14.1 (the second
CI environment). Without it these tests skip, unless TOKENREDUCE_REQUIRE_EXTRAS names "clip" (CI's second
environment sets it), where a missing open_clip fails instead.
"""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before open_clip imports huggingface_hub: never try the network

import numpy as np
import pytest
import torch

import tokenreduce as tr

if "clip" in os.environ.get("TOKENREDUCE_REQUIRE_EXTRAS", "").split(","):
    import open_clip
else:
    open_clip = pytest.importorskip("open_clip", reason="the clip extra: pip install 'tokenreduce[clip]'")

from tokenreduce.adapters.videollm import video_inputs  # noqa: E402
from tokenreduce.adapters.videollm.zoo import build_video_llm  # noqa: E402

from tokenreduce.prune.quota import ClipScorer, QuoTA  # noqa: E402
from tokenreduce.registry import adapter_for  # noqa: E402

pytestmark = pytest.mark.clip

NAME = "tokenreduce-test-tiny"  # an open_clip architecture registered by the `tiny_arch` fixture
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220), "grey": (110, 110, 110),
           "yellow": (230, 220, 30)}
PROMPT = "USER: <video>\nWhat colour is the ball? ASSISTANT:"


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory) -> str:
    """A 1-layer, 32-wide ViT/text-transformer CLIP at 32 px, added to open_clip's model registry."""
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = tmp_path_factory.mktemp("open_clip_cfg") / f"{NAME}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    assert NAME in open_clip.list_models()
    return NAME


@pytest.fixture(scope="module")
def trained(tiny_arch, tmp_path_factory):
    """(checkpoint file, state dict): the tiny architecture trained contrastively, colour names vs colour frames,
    through open_clip's own preprocessing and tokenizer."""
    torch.manual_seed(0)
    model, _, val_tf = open_clip.create_model_and_transforms(tiny_arch)
    tokenizer = open_clip.get_tokenizer(tiny_arch)
    names = list(COLOURS)
    text = tokenizer(names)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steps this small spend more time syncing two threads than computing
    try:
        _train(model, val_tf, text, names, g, opt)
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("open_clip_ckpt") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train(model, preprocess, text, names, g, opt, steps: int = 150) -> None:
    """Contrastive steps on noisy flat colour frames vs their colour names (images through `preprocess`)."""
    from PIL import Image

    for _ in range(steps):
        noise = torch.randint(-12, 13, (len(names), 32, 32, 3), generator=g)
        imgs = [Image.fromarray((torch.tensor(COLOURS[c]) + n).clamp(0, 255).to(torch.uint8).numpy())
                for c, n in zip(names, noise)]
        img = model.encode_image(torch.stack([preprocess(i) for i in imgs]), normalize=True)
        txt = model.encode_text(text, normalize=True)
        logits = model.logit_scale.exp() * img @ txt.T
        target = torch.arange(len(names))
        loss = (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target))
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(scope="module")
def onevision():
    model, tok = build_video_llm("tiny-onevision", seed=0)
    return model, tok, adapter_for(model)(model).video_spec()


def needle_video() -> np.ndarray:
    """Eight flat colour frames; frame 5 is the only red one."""
    return np.stack([np.full((64, 64, 3), COLOURS[c], np.uint8)
                     for c in ["grey", "green", "blue", "grey", "yellow", "red", "blue", "green"]])


def test_open_clip_scorer_loads_the_checkpoint_and_finds_the_needle(trained, onevision):
    path, weights = trained
    model, tok, spec = onevision
    scorer = ClipScorer.open_clip(NAME, pretrained=path, vlm_mean=spec.mean, vlm_std=spec.std, query="red")
    loaded = scorer.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())  # the file's weights, not a fresh init
    x = video_inputs(tok, spec, [PROMPT], [needle_video()])
    scores = scorer(x["pixel_values_videos"][0], "ignored: query= is fixed")
    assert scores.shape == (8,) and scores.dtype == torch.float32
    assert bool(((scores >= 0) & (scores <= 1)).all())
    assert int(scores.argmax()) == 5, scores
    # QuoTA gives the red frame the largest share of a 40-token budget
    with torch.no_grad(), tr.apply(model, tr.Plan([QuoTA(tokens=40, scorer=scorer, resize="pool")]),
                                   tokenizer=tok) as run:
        model(**x)
    call = run.report.calls[0]
    assert call.tokens() == [40]
    assert int(torch.bincount(call.visual[0].item, minlength=8).argmax()) == 5


def test_open_clip_scorer_follows_the_question(trained, onevision):
    """Without a fixed query the prompt text is the query: asking for blue ranks a blue frame first."""
    path, _ = trained
    _, tok, spec = onevision
    scorer = ClipScorer.open_clip(NAME, pretrained=str(path), vlm_mean=spec.mean, vlm_std=spec.std)
    x = video_inputs(tok, spec, [PROMPT], [needle_video()])
    scores = scorer(x["pixel_values_videos"][0], "blue")
    assert int(scores.argmax()) in (2, 6)


def test_open_clip_scorer_matches_open_clip_by_hand(trained, onevision):
    """The score is sigmoid(scale * (cos - mean cos)) of open_clip's own preprocess + encode on the frames."""
    from PIL import Image

    path, _ = trained
    _, tok, spec = onevision
    scorer = ClipScorer.open_clip(NAME, pretrained=path, vlm_mean=spec.mean, vlm_std=spec.std)
    model, _, preprocess = open_clip.create_model_and_transforms(NAME, pretrained=str(path))
    x = video_inputs(tok, spec, [PROMPT], [needle_video()])["pixel_values_videos"][0]
    with torch.no_grad():
        frames = (x * torch.tensor(spec.std)[:, None, None] + torch.tensor(spec.mean)[:, None, None]).clamp(0, 1)
        pil = [Image.fromarray((f * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()) for f in frames]
        img = model.eval().encode_image(torch.stack([preprocess(p) for p in pil]), normalize=True)
        txt = model.encode_text(open_clip.get_tokenizer(NAME)(["green"]), normalize=True)
        cos = (img @ txt.T).flatten()
        ref = torch.sigmoid(model.logit_scale.exp() * (cos - cos.mean()))
    torch.testing.assert_close(scorer(x, "green"), ref, atol=1e-5, rtol=0)


def test_open_clip_scorer_with_random_weights_runs_any_architecture(onevision):
    """pretrained=None: a real open_clip architecture with random weights (plumbing only, no download)."""
    _, tok, spec = onevision
    scorer = ClipScorer.open_clip("ViT-B-32", vlm_mean=spec.mean, vlm_std=spec.std)
    x = video_inputs(tok, spec, [PROMPT], [needle_video()[:2]])
    scores = scorer(x["pixel_values_videos"][0], "a red ball")
    assert scores.shape == (2,) and bool(((scores >= 0) & (scores <= 1)).all())


@pytest.mark.parametrize("kwargs, error, match", [
    ({"name": "ViT-B-33"}, tr.InputError, r"unknown model 'ViT-B-33'; did you mean ViT-B-32"),
    ({"name": "ViT-B-32", "pretrained": "openai"}, tr.InputError, r"pretrained='openai' is not a file.*never download"),
    ({"name": "hf-hub:timm/ViT-B-16-SigLIP"}, tr.InputError, r"would download from the hub"),
    ({"name": NAME, "precision": "fp7"}, tr.InputError, r"precision must be one of fp32, fp16, bf16"),
    ({"name": NAME, "pretrained": "/nonexistent/tiny.pt"}, tr.InputError, r"'/nonexistent/tiny.pt' is not a file"),
])
def test_open_clip_bad_arguments(tiny_arch, kwargs, error, match):
    with pytest.raises(error, match=match):
        ClipScorer.open_clip(vlm_mean=(0.5,) * 3, vlm_std=(0.5,) * 3, **kwargs)


def test_open_clip_checkpoint_of_another_architecture(trained, tmp_path):
    _, weights = trained
    wrong = {k: torch.zeros(v.shape[0], v.shape[1] + 1) if k == "positional_embedding" else v
             for k, v in weights.items()}  # one tensor of another width, as a checkpoint of a wider model has
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(tr.InputError, match=rf"ClipScorer.open_clip\('{NAME}', pretrained=.*wrong.pt'\): "):
        ClipScorer.open_clip(NAME, pretrained=tmp_path / "wrong.pt", vlm_mean=(0.5,) * 3, vlm_std=(0.5,) * 3)


def test_scorer_refuses_frames_of_the_wrong_shape(trained):
    path, _ = trained
    scorer = ClipScorer.open_clip(NAME, pretrained=path, vlm_mean=(0.5,) * 3, vlm_std=(0.5,) * 3)
    with pytest.raises(tr.InputError, match=r"\(T, 3, S, S\) tensor with T >= 1, got torch.Size\(\[3, 32, 32\]\)"):
        scorer(torch.zeros(3, 32, 32), "red")
