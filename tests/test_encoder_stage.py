"""ENCODER stage, HiRED and MustDrop's vision stage on LLaVA-1.5 and LLaVA-NeXT (DESIGN.md section 5 oracles)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_image, prompt
from tokenreduce.adapters.llava.zoo import build_llava, build_llava_with_processor

import tokenreduce as tr
from tokenreduce.merge.window import window_similarity
from tokenreduce.plan import allocate
from tokenreduce.prune.hired import HiRED

PRESETS = ["tiny", "tiny-next"]
PLANS = ["hired(keep=0.25)", "mustdrop-vision(threshold=0.3)", "mustdrop-vision(threshold=0.3)+hired(keep=0.3)"]


@pytest.fixture(scope="module")
def zoo():
    """(model, processor) per (preset, attention), the same weights under sdpa and eager."""
    out = {}
    for preset in PRESETS:
        for attn in ("sdpa", "eager"):
            out[preset, attn] = build_llava_with_processor(preset, seed=0, attn=attn)
    return out


def inputs(processor, sizes=((200, 120),), texts=None):
    texts = texts or [prompt("What is in the picture?")] * len(sizes)
    images = [make_image(i + 1, s) for i, s in enumerate(sizes)]
    return processor(text=texts, images=images, padding=True, return_tensors="pt")


def run(model, x, plan, n=4):
    with torch.no_grad(), tr.apply(model, plan) as h:
        logits = model(**x).logits
        tokens = model.generate(**x, max_new_tokens=n, do_sample=False)
    return logits, tokens, h.report.calls[0]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("plan", ["none", "hired(keep=1.0)", "mustdrop-vision(threshold=1.01)"])
def test_noop_identity_with_probes(zoo, preset, attn, plan):
    """Keep-all plans (probes and the layer-by-layer tower included) are bit-identical to the stock model."""
    model, proc = zoo[preset, attn]
    x = inputs(proc)
    with torch.no_grad():
        ref = model(**x).logits
        ref_tokens = model.generate(**x, max_new_tokens=4, do_sample=False)
    out, tokens, _ = run(model, x, plan)
    assert torch.equal(out, ref)
    assert torch.equal(tokens, ref_tokens)


def _reference(model, x, call):
    """Vanilla LLM on inputs_embeds holding exactly the kept tokens (and the newlines they keep)."""
    ids = x["input_ids"][0]
    with torch.no_grad():
        mm = model.model.get_image_features(**{k: v for k, v in x.items() if k in ("pixel_values", "image_sizes")})
        stock = torch.cat(list(mm.pooler_output))  # every visual token of the stock sequence, in order
    kept = call.positions[0]
    is_ph = ids == model.config.image_token_id
    rank = torch.cumsum(is_ph.long(), 0) - 1  # n-th placeholder of the caller's prompt
    embeds = model.get_input_embeddings()(ids[kept]).clone()
    vis = is_ph[kept]
    embeds[vis] = stock[rank[kept[vis]]]
    with torch.no_grad():
        return model(inputs_embeds=embeds[None]).logits


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("keep", [0.5, 0.2])
def test_hired_explicit_equivalence(zoo, preset, keep):
    model, proc = zoo[preset, "sdpa"]
    x = inputs(proc)
    out, _, call = run(model, x, f"hired(keep={keep})")
    n = call.tokens("input")[0]
    assert call.tokens() == [round(keep * n)]
    torch.testing.assert_close(out, _reference(model, x, call), atol=1e-4, rtol=0)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("plan", PLANS)
def test_same_kept_set_under_sdpa_and_eager(zoo, preset, plan):
    calls = [run(zoo[preset, a][0], inputs(zoo[preset, a][1]), plan)[2] for a in ("sdpa", "eager")]
    assert calls[0].tokens() == calls[1].tokens()
    assert torch.equal(calls[0].visual[0].position, calls[1].visual[0].position)
    assert torch.equal(calls[0].visual[0].source, calls[1].visual[0].source)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("plan", ["none", *PLANS])
def test_batch_of_different_image_sizes_equals_each_alone(zoo, preset, plan):
    model, proc = zoo[preset, "sdpa"]
    sizes = ((200, 120), (100, 160))
    texts = [prompt("What is in the picture?"), prompt("Colour?")]
    xb = inputs(proc, sizes, texts)
    out_b, gen_b, call_b = run(model, xb, plan)
    width = xb["input_ids"].shape[1]
    for b, (size, text) in enumerate(zip(sizes, texts)):
        x1 = proc(text=[text], images=[make_image(b + 1, size)], return_tensors="pt")
        out_1, gen_1, call_1 = run(model, x1, plan)
        assert call_b.tokens()[b] == call_1.tokens()[0]
        n = call_1.seq_llm[0]
        torch.testing.assert_close(out_b[b, -n:], out_1[0], atol=1e-4, rtol=1e-4)
        new_1 = gen_1[0, x1["input_ids"].shape[1]:]  # may stop early at </s>; the batch pads after it
        assert torch.equal(gen_b[b, width:width + new_1.numel()], new_1)


def test_next_newlines_follow_surviving_rows(zoo):
    """LLaVA-NeXT: a row newline enters the LLM iff a token of its mosaic row survives."""
    model, proc = zoo["tiny-next", "sdpa"]
    x = inputs(proc)
    _, _, full = run(model, x, "none")
    _, _, red = run(model, x, "hired(keep=0.1)")
    crop = red.visual[0].items
    rows = {(int(r), int(i)) for r, i in zip(red.visual[0].row, red.visual[0].item) if crop[int(i)].kind == "crop"}
    assert 0 < red.extra_tokens[0] < full.extra_tokens[0]
    assert red.seq_llm[0] == full.seq_llm[0] - full.tokens()[0] - full.extra_tokens[0] + red.tokens()[0] + \
        red.extra_tokens[0]
    assert len(rows) >= 1


def test_probe_rows_equal_eager_attention_weights():
    """The CLS rows recorded by the tower runner equal eager attention weights of the vision tower."""
    model = build_llava("tiny", seed=1, attn="eager", vision_layers=3)
    pv = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        att = model.model.vision_tower(pv, output_attentions=True).attentions
    from tokenreduce.adapters.llava.llava15 import hf_vision_tower

    from tokenreduce.encoder import run_tower

    tower = hf_vision_tower(model.model.vision_tower, -1)
    vts = [tr.VisualTokens.from_items([torch.zeros(64, 0)], [(8, 8)], torch.arange(64)) for _ in range(2)]
    probes = [tr.plan.Probe(f"cls@{i}", i) for i in range(3)]
    with torch.no_grad():
        out = run_tower(tower, pv, vts, [], probes, [tr.Context()] * 2)
    for i in range(3):
        ref = att[i].sum(1)[:, 0, 1:]
        for b in range(2):
            torch.testing.assert_close(out.batch[b].scores[f"cls@{i}"], ref[b], atol=1e-5, rtol=0)


def test_hired_refuses_a_tower_without_cls():
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    cfg = LlavaConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=112, patch_size=14),
        text_config=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                num_attention_heads=4, vocab_size=300),
        image_token_id=299, vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(cfg)
    with pytest.raises(tr.UnsupportedModelError, match="CLS"):
        tr.attach(model, "hired")
    tr.attach(model, "pool(keep=0.5)").detach()  # a reducer without CLS probes is fine


# -- HiRED budgets ---------------------------------------------------------------------------------


def anyres_tokens(overview_attn: torch.Tensor, seed: int = 0) -> tr.VisualTokens:
    """An overview 8x8 grid plus a 2x2 grid of 8x8 crops covering the image's quadrants."""
    g = torch.Generator().manual_seed(seed)
    items = [tr.tokens.ItemInfo(kind="overview")] + [
        tr.tokens.ItemInfo(kind="crop", region=(r / 2, c / 2, (r + 1) / 2, (c + 1) / 2)) for r in (0, 1) for c in (0, 1)
    ]
    vt = tr.VisualTokens.from_items([torch.randn(64, 4, generator=g) for _ in range(5)], [(8, 8)] * 5,
                                    torch.arange(320), items)
    final = torch.rand(320, generator=g)
    init = torch.cat([overview_attn.flatten(), torch.rand(256, generator=g)])
    vt.scores.update({"cls@0": init, "cls@feature": final})
    return vt


@pytest.mark.parametrize("budget", [1, 5, 37, 64, 100, 319, 320])
@pytest.mark.parametrize("parts", [1, 5])
def test_hired_budget_sums_exactly(budget, parts):
    vt = anyres_tokens(torch.rand(8, 8))
    if parts == 1:
        vt = tr.VisualTokens.from_items([vt.features[:64]], [(8, 8)], torch.arange(64))
        vt.scores.update({"cls@0": torch.rand(64), "cls@feature": torch.rand(64)})
        budget = min(budget, 64)
    out = HiRED(tokens=budget).reduce_sample(vt, tr.Context())
    assert len(out) == budget
    # each partition keeps its own top tokens by final-layer attention
    for i in range(vt.num_items):
        kept = out.source.view(-1)[vt.item == i] >= 0
        scores = vt.scores["cls@feature"][vt.item == i]
        if kept.any() and (~kept).any():
            assert scores[kept].min() >= scores[~kept].max()


def test_hired_crop_budgets_follow_spatial_regions_not_bands():
    """All overview attention in the bottom-left quadrant: crop (1, 0) gets the whole crop budget.

    The released code maps the 8x8 map to crops by horizontal bands, which would give crop (1, 0) only
    the rows 4-5 band and split the mass with crop (1, 1).
    """
    attn = torch.zeros(8, 8)
    attn[4:, :4] = 1.0
    vt = anyres_tokens(attn)
    hired = HiRED(tokens=40, alpha=0.5)
    budgets = hired.partition_budgets(vt, list(range(5)), 40, "cls@0")
    assert budgets == [20, 0, 0, 20, 0]
    attn[4:, 4:] = 0.5  # the release's count rule: top 32 of 64 = the bottom half, 16 in each bottom crop
    vt = anyres_tokens(attn)
    assert HiRED(tokens=40, allocation="count").partition_budgets(vt, list(range(5)), 40, "cls@0") == [20, 0, 0, 10, 10]


def test_hired_uses_each_samples_own_scores():
    """The release applies batch element 0's mask to every image; here each sample keeps its own top tokens."""
    a, b = anyres_tokens(torch.rand(8, 8), seed=1), anyres_tokens(torch.rand(8, 8), seed=2)
    outs = HiRED(keep=0.2).reduce([a, b], [tr.Context(sample=0), tr.Context(sample=1)])
    assert torch.equal(outs[1].source, HiRED(keep=0.2).reduce_sample(b, tr.Context()).source)
    assert not torch.equal(outs[0].source, outs[1].source)


def test_allocate_is_exact_and_respects_caps():
    assert allocate(10, [1, 1, 1], [10, 10, 10]) == [4, 3, 3]
    assert allocate(10, [100, 1, 1], [2, 10, 10]) == [2, 4, 4]
    assert allocate(7, [0, 0], [3, 5]) == [3, 4]
    for total in range(0, 31):
        parts = allocate(total, [0.5, 3.0, 0.0, 1.5], [5, 10, 7, 8])
        assert sum(parts) == total and all(0 <= p <= c for p, c in zip(parts, [5, 10, 7, 8]))
    with pytest.raises(tr.BudgetError):
        allocate(31, [1, 1], [15, 15])


@pytest.mark.parametrize("bad", ["hired(alpha=1.5)", "hired(allocation='bands')", "hired(keep=0)",
                                 "mustdrop-vision(window=1)", "mustdrop-vision(key_ratio=2)"])
def test_bad_parameters_are_named(bad):
    with pytest.raises(tr.TokenReduceError, match=bad.split("(")[1].split("=")[0]):
        tr.Plan.parse(bad)


# -- MustDrop vision stage ---------------------------------------------------------------------------


def test_window_similarity_matches_a_direct_computation():
    x = torch.randn(2, 6, 7, 5)
    sim = window_similarity(x, 3)
    assert sim.shape == (2, 2, 2)
    for g in range(2):
        for i in range(2):
            for j in range(2):
                w = torch.nn.functional.normalize(x[g, 3 * i:3 * i + 3, 3 * j:3 * j + 3].reshape(9, 5), dim=-1)
                c = w @ w.T
                torch.testing.assert_close(sim[g, i, j], (c.sum() - c.diagonal().sum()) / 72, atol=1e-6, rtol=0)


def test_mustdrop_vision_merges_exactly_the_windows_over_threshold():
    from tokenreduce.merge.window import MustDropVision

    feats = torch.randn(64, 6)
    grid = feats.reshape(8, 8, 6)
    grid[0:3, 3:6] = torch.randn(6) + 0.01 * torch.randn(3, 3, 6)  # a near-constant window
    vt = tr.VisualTokens.from_items([grid.reshape(64, 6)], [(8, 8)], torch.arange(64))
    sim = window_similarity(grid[None], 3)[0]
    expected = int((sim >= 0.8).sum())
    assert expected >= 1
    out = MustDropVision(threshold=0.8).merge(vt)
    assert len(out) == 64 - 8 * expected
    merged = torch.nonzero(out.size == 9).flatten()
    assert merged.numel() == expected
    i = int(torch.nonzero((out.row == 0) & (out.col == 3)).flatten()[0])
    torch.testing.assert_close(out.features[i], grid[0:3, 3:6].reshape(9, 6).mean(0))
    assert torch.equal(torch.argsort(out.position), torch.arange(len(out)))  # spatial order kept


def test_mustdrop_vision_shortens_the_tower_and_marks_keys(zoo):
    """Later vision layers really run on fewer tokens; the key set is ceil(8%) of each item's tokens."""
    model, proc = zoo["tiny", "sdpa"]
    x = proc(text=prompt("hi"), images=make_image(1, (112, 112)), return_tensors="pt")
    seen = []
    hook = model.model.vision_tower.encoder.layers[1].register_forward_pre_hook(
        lambda m, a: seen.append(a[0].shape[1]))
    try:
        _, _, call = run(model, x, "mustdrop-vision(threshold=-1.0)")  # every full window merges
    finally:
        hook.remove()
    assert call.tokens() == [64 - 8 * 4]  # 8x8 grid: four full 3x3 windows
    assert seen and seen[0] == 1 + 32
    v = call.visual[0]
    assert int(v.scores["key"].sum()) == -(-8 * 32 // 100)


def test_mustdrop_vision_ragged_items_in_one_tower_batch(zoo):
    """Two images that merge different numbers of windows share one padded tower batch, like alone."""
    model, proc = zoo["tiny", "eager"]
    imgs = [make_image(1, (112, 112)), make_image(2, (112, 112))]
    x = proc(text=[prompt("a", 2)], images=imgs, return_tensors="pt")
    x["pixel_values"][0] = 0.0  # image 0 merges all its windows, image 1 few or none
    _, _, call = run(model, x, "mustdrop-vision(threshold=0.5)")
    alone = []
    for i in range(2):
        x1 = proc(text=[prompt("a")], images=[imgs[i]], return_tensors="pt")
        x1["pixel_values"] = x["pixel_values"][i:i + 1]
        alone.append(run(model, x1, "mustdrop-vision(threshold=0.5)")[2].visual[0])
    v = call.visual[0]
    for i in range(2):
        torch.testing.assert_close(v.features[v.item == i], alone[i].features, atol=1e-5, rtol=0)
    assert (v.item == 0).sum() != (v.item == 1).sum()
