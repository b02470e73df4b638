"""QuoTA: exact per-frame budgets, resizing, scorers (model itself, CLIP, function), composition, report."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from tokenreduce.adapters.videollm import video_inputs
from tokenreduce.adapters.videollm.zoo import build_video_llm

import tokenreduce as tr
from tokenreduce.prune.quota import ClipScorer, QuoTA, frame_budgets, frame_weights, grid_shape, vlm_yes_probability
from tokenreduce.registry import adapter_for

PROMPTS = ["USER: <video>\nWhat colour is the ball? ASSISTANT:", "USER: <video>\nIs there a dog? ASSISTANT:"]


@pytest.fixture(scope="module")
def onevision():
    model, tok = build_video_llm("tiny-onevision", seed=0)
    return model, tok, adapter_for(model)(model).video_spec()


def haystack(frames: int = 8, needle: int | None = None, seed: int = 0) -> np.ndarray:
    """Grey-ish noisy frames; the needle frame is a saturated red one."""
    rng = np.random.default_rng(seed)
    x = (rng.integers(90, 130, (frames, 64, 64, 3))).astype(np.uint8)
    if needle is not None:
        x[needle] = np.array([220, 20, 20], dtype=np.uint8)
    return x


def run(model, tok, x, plan):
    with torch.no_grad(), tr.apply(model, plan, tokenizer=tok) as h:
        logits = model(**x).logits
        tokens = model.generate(**x, max_new_tokens=3, do_sample=False)
    return logits, tokens, h.report.calls[0]


def test_frame_budgets_sum_exactly_for_any_frames_and_budget():
    rnd = random.Random(0)
    for _ in range(400):
        frames = rnd.randint(1, 40)
        counts = [rnd.choice([4, 16, 196]) for _ in range(frames)]
        total = rnd.randint(0, sum(counts))
        weights = [rnd.random() ** 2 for _ in range(frames)]
        floor = rnd.choice([0, 1, 4])
        b = frame_budgets(total, weights, counts, floor)
        assert sum(b) == total
        assert all(0 <= x <= c for x, c in zip(b, counts))
        if total >= sum(min(floor, c) for c in counts):
            assert all(x >= min(floor, c) for x, c in zip(b, counts))


def test_budget_smaller_than_the_frame_count_goes_to_the_most_relevant_frames():
    b = frame_budgets(3, [0.1, 0.9, 0.2, 0.8, 0.05], [16] * 5, floor=1)
    assert b == [0, 1, 1, 1, 0]


def test_weights_follow_quota_p_squared():
    p = torch.tensor([0.5, 1.0, 0.0])
    assert torch.equal(frame_weights(p), torch.tensor([0.25, 1.0, 0.0]))
    assert frame_budgets(50, frame_weights(p).tolist(), [196] * 3, floor=0) == [10, 40, 0]


def test_grid_shape_never_exceeds_budget_or_grid():
    for n in range(1, 197):
        h, w = grid_shape(n, 14, 14)
        assert h * w <= n and h <= 14 and w <= 14
        assert h * w >= n - 14  # close to the share
    assert grid_shape(196, 14, 14) == (14, 14)


def test_uniform_full_budget_is_bit_identical(onevision):
    """Uniform scores and every frame's whole grid: the stock sequence exactly (bilinear at scale 1)."""
    model, tok, spec = onevision
    x = video_inputs(tok, spec, PROMPTS[:1], [haystack()])
    with torch.no_grad():
        ref, ref_tokens = model(**x).logits, model.generate(**x, max_new_tokens=3, do_sample=False)
    out, tokens, call = run(model, tok, x, "quota(keep=1.0, scorer=uniform)")
    assert torch.equal(out, ref) and torch.equal(tokens, ref_tokens)
    assert call.tokens() == [8 * 16]


@pytest.mark.parametrize("resize", ["pool", "aim-merge", "random"])
def test_inner_reducer_meets_the_budget_exactly(onevision, resize):
    model, tok, spec = onevision
    x = video_inputs(tok, spec, PROMPTS[:1], [haystack(needle=3)])
    _, _, call = run(model, tok, x, f"quota(tokens=37, scorer=uniform, resize='{resize}')")
    assert call.tokens() == [37]
    counts = torch.bincount(call.visual[0].item, minlength=8).tolist()
    assert counts == frame_budgets(37, [1.0] * 8, [16] * 8, 1)


def test_bilinear_stays_within_the_budget_and_keeps_frame_order(onevision):
    model, tok, spec = onevision
    x = video_inputs(tok, spec, PROMPTS[:1], [haystack()])
    _, _, call = run(model, tok, x, "quota(tokens=50, scorer=uniform)")
    v = call.visual[0]
    assert len(v) <= 50
    assert bool((v.position[1:] > v.position[:-1]).all())
    assert sorted(set(v.item.tolist())) == list(range(8))


def test_needle_frame_gets_the_largest_share(onevision):
    """One red frame among grey ones, a scorer for "red": the needle is ranked first and gets the most tokens."""
    model, tok, spec = onevision
    needle = 5
    x = video_inputs(tok, spec, PROMPTS[:1], [haystack(needle=needle)])
    mean, std = torch.tensor(spec.mean)[:, None, None], torch.tensor(spec.std)[:, None, None]

    def redness(pixels, question, ctx):
        rgb = pixels * std + mean  # back to [0, 1]
        return (rgb[:, 0] - rgb[:, 1:].mean(1)).clamp(min=0).mean((1, 2)) * 2

    plan = tr.Plan([QuoTA(tokens=40, scorer=redness, resize="pool")])
    _, _, call = run(model, tok, x, plan)
    counts = torch.bincount(call.visual[0].item, minlength=8)
    assert int(counts.argmax()) == needle
    assert int(counts[needle]) == 16 and int(counts.sum()) == 40


def test_vlm_scorer_equals_the_models_own_yes_probability(onevision):
    """P(yes)/(P(yes)+P(no)) per frame, batched, from the unreduced model through the Context's services; reported
    as its own time. The reference asks the model by hand, in its chat format, one frame at a time."""
    model, tok, spec = onevision
    x = video_inputs(tok, spec, PROMPTS[:1], [haystack(needle=2)])
    _, _, call = run(model, tok, x, "quota(tokens=40, resize=pool, batch=3)")
    assert call.times["score:quota"] > 0
    prompt = QuoTA(tokens=1).prompt.format(query="q")
    seen = {}

    def scorer(pixels, question, ctx):  # the services a reducer gets, inside a real reduced call
        seen["got"] = vlm_yes_probability(ctx, pixels, prompt, batch=3)
        seen["pixels"] = pixels
        return seen["got"]

    with torch.no_grad(), tr.apply(model, tr.Plan([QuoTA(tokens=40, scorer=scorer, resize="pool")]), tokenizer=tok):
        model(**x)
    got, pixels = seen["got"], seen["pixels"]
    assert torch.equal(pixels, x["pixel_values_videos"][0])
    yes = tok(" yes", add_special_tokens=False)["input_ids"][0]
    no = tok(" no", add_special_tokens=False)["input_ids"][0]
    for t in (0, 2, 7):
        text = "USER: " + spec.token * spec.tokens(1) + "\n" + prompt + " ASSISTANT:"
        inputs = dict(tok([text], return_tensors="pt"), pixel_values_videos=pixels[t:t + 1][:, None])
        with torch.no_grad():
            logp = torch.log_softmax(model(**inputs).logits[0, -1].float(), -1)
        ids_yes = sorted({tok(w, add_special_tokens=False)["input_ids"][0] for w in (" yes", " Yes", "yes", "Yes")})
        ids_no = sorted({tok(w, add_special_tokens=False)["input_ids"][0] for w in (" no", " No", "no", "No")})
        ids_yes, ids_no = sorted(set(ids_yes) - set(ids_no)), sorted(set(ids_no) - set(ids_yes))
        ref = torch.sigmoid(logp[ids_yes].logsumexp(0) - logp[ids_no].logsumexp(0))
        torch.testing.assert_close(got[t], ref, atol=1e-5, rtol=0)
    assert yes == no  # the byte tokenizer starts " yes" and " no" with the same space: the scorer skips it


def test_context_services_need_an_attached_plan():
    """A Context made by hand has no model behind it: its services say so instead of failing deep inside."""
    ctx = tr.Context()
    for call in (lambda: ctx.ask(input_ids=None), lambda: ctx.generate("hi"), lambda: ctx.chat("hi"),
                 lambda: ctx.frame_inputs(torch.zeros(1, 3, 8, 8), "hi")):
        with pytest.raises(tr.UnsupportedModelError, match="attached plan"):
            call()


def test_vlm_scorer_needs_the_tokenizer(onevision):
    model, tok, spec = onevision
    x = video_inputs(tok, spec, PROMPTS[:1], [haystack()])
    with tr.apply(model, "quota(tokens=40)"), pytest.raises(tr.PlanError, match="tokenizer"):
        model(**x)


def test_quota_composes_with_merging_and_in_llm_pruning(onevision):
    model, tok, spec = onevision
    x = video_inputs(tok, spec, PROMPTS, [haystack(needle=1), haystack(needle=6, seed=1)])
    _, tokens, call = run(model, tok, x, "quota(tokens=48, scorer=uniform)+aim-merge(keep=0.5)+aim-prune")
    assert [c for _, c in call.stages] == [[128, 128], [48, 48], [24, 24]]
    # the LLM sees the 24 tokens plus the newline after the last frame; aim-prune drops visual tokens late
    assert call.extra_tokens == [1, 1]
    assert call.llm_visual[0] == [25, 25] and call.llm_visual[-1][0] < 25
    assert tokens.shape[0] == 2


def test_batch_equals_each_sample_alone(onevision):
    model, tok, spec = onevision
    vids = [haystack(needle=1), haystack(needle=6, seed=1)]
    xb = video_inputs(tok, spec, PROMPTS, vids)
    plan = "quota(tokens=40, resize=pool)"
    out_b, _, call_b = run(model, tok, xb, plan)
    for b in range(2):
        x1 = video_inputs(tok, spec, PROMPTS[b:b + 1], vids[b:b + 1])
        out_1, _, call_1 = run(model, tok, x1, plan)
        assert torch.equal(call_b.visual[b].source, call_1.visual[0].source)
        n = call_1.seq_llm[0]
        torch.testing.assert_close(out_b[b, -n:], out_1[0], atol=1e-4, rtol=1e-4)


def test_bad_quota_parameters():
    with pytest.raises(tr.PlanError, match="resize"):
        tr.Plan.parse("quota(tokens=10, resize=hired2)")
    with pytest.raises(tr.PlanError, match="scorer"):
        tr.Plan.parse("quota(tokens=10, scorer=magic)")
    with pytest.raises(tr.PlanError, match="floor"):
        tr.Plan.parse("quota(tokens=10, floor=-1)")


def _train_tiny_clip(colours: dict[str, tuple[int, int, int]], steps: int = 150):
    """A tiny CLIP trained contrastively for a few seconds to tell colour names from colour frames."""
    from tokenreduce.adapters.llava.processing import byte_tokenizer
    from transformers import CLIPConfig, CLIPModel

    tok = byte_tokenizer()
    tok.padding_side = "right"
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=len(tok), max_position_embeddings=16, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    clip = CLIPModel(cfg)
    opt = torch.optim.AdamW(clip.parameters(), lr=3e-3)
    names = list(colours)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randperm(len(names), generator=g)
        rgb = torch.tensor([colours[names[i]] for i in idx], dtype=torch.float32)[:, :, None, None] / 255
        img = rgb.expand(-1, 3, 32, 32) + 0.05 * torch.randn(len(idx), 3, 32, 32, generator=g)
        enc = tok([names[i] + "</s>" for i in idx], padding=True, return_tensors="pt")
        out = clip(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                   pixel_values=(img - mean) / std, return_loss=True)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return clip.eval(), tok


def test_clip_scorer_finds_the_needle(onevision):
    """A (tiny, trained-here) CLIP scorer ranks the one red frame first for the query "red"."""
    colours = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220), "grey": (110, 110, 110),
               "yellow": (230, 220, 30)}
    clip, ctok = _train_tiny_clip(colours)
    model, tok, spec = onevision
    frames = np.stack([np.full((64, 64, 3), colours[c], np.uint8)
                       for c in ["grey", "green", "blue", "grey", "yellow", "red", "blue", "green"]])
    x = video_inputs(tok, spec, PROMPTS[:1], [frames])
    scorer = ClipScorer(clip, ctok, spec.mean, spec.std, query="red</s>")
    scores = scorer(x["pixel_values_videos"][0], "USER: what colour? ASSISTANT:")
    assert scores.shape == (8,) and bool(((scores >= 0) & (scores <= 1)).all())
    assert int(scores.argmax()) == 5
    _, _, call = run(model, tok, x, tr.Plan([QuoTA(tokens=40, scorer=scorer, resize="pool")]))
    assert int(torch.bincount(call.visual[0].item, minlength=8).argmax()) == 5


def test_query_decoupling_parses_safely():
    from tokenreduce.prune.quota import parse_decoupled

    assert parse_decoupled("Step 1: Yes. Step 2: ['red ball', 'table', 'joy'] Step 3: ['red ball', 'table']") == [
        "red ball", "table"]
    assert parse_decoupled("step 1: no. step 2: null step 3: null") is None
    assert parse_decoupled("Step 1: yes Step 3: []") is None
    assert parse_decoupled("Step 1: yes Step 3: [__import__('os').system('x')]") is None  # never eval
    assert parse_decoupled("gibberish") is None


def test_quota_with_decoupling_runs_and_reports_its_time(onevision):
    """The model's own (random) answer names no objects here, so scoring falls back to the question."""
    model, tok, spec = onevision
    x = video_inputs(tok, spec, PROMPTS[:1], [haystack()])
    _, _, call = run(model, tok, x, "quota(tokens=40, resize=pool, decouple=true)")
    assert call.tokens() == [40]
    assert call.times["decouple:quota"] > 0 and call.times["score:quota"] > 0


def test_siglip_scorer_uses_its_learned_scale_and_bias(onevision):
    from tokenreduce.adapters.llava.processing import byte_tokenizer
    from transformers import SiglipConfig, SiglipModel

    tok = byte_tokenizer()
    cfg = SiglipConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=len(tok), max_position_embeddings=32),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
    )
    torch.manual_seed(0)
    siglip = SiglipModel(cfg).eval()
    model, vtok, spec = onevision
    x = video_inputs(vtok, spec, PROMPTS[:1], [haystack()])
    scorer = ClipScorer(siglip, tok, spec.mean, spec.std, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    scores = scorer(x["pixel_values_videos"][0], "a red ball")
    assert scores.shape == (8,) and bool(((scores > 0) & (scores < 1)).all())
    # sigmoid(scale * cos + bias) with SigLIP's own parameters: recompute one frame by hand
    std, mean = torch.tensor(spec.std)[:, None, None], torch.tensor(spec.mean)[:, None, None]
    px = x["pixel_values_videos"][0][:1].float() * std + mean
    px = torch.nn.functional.interpolate(px, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    with torch.no_grad():
        f = siglip.get_image_features(pixel_values=(px - 0.5) / 0.5)
        f = torch.nn.functional.normalize(getattr(f, "pooler_output", f), dim=-1)
        t = siglip.get_text_features(**tok(["a red ball"], return_tensors="pt"))
        t = torch.nn.functional.normalize(getattr(t, "pooler_output", t), dim=-1)
        ref = torch.sigmoid(siglip.logit_scale.exp() * (f @ t.T) + siglip.logit_bias)
    torch.testing.assert_close(scores[0], ref.flatten()[0], atol=1e-5, rtol=0)
