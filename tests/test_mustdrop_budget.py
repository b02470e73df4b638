"""MustDrop's depth-scaled default layers and its budget form (a layer-average target instead of thresholds).

The schedule is checked against an exhaustive search; the budget against the engine's real per-layer counts (the
report equals the tensors); the form's kept set against the threshold rule at the count that rule keeps.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from decoders import tiny
from test_aim_prune import SAMPLES, batch, run

import tokenreduce as tr
from tokenreduce.prune.mustdrop import (
    MustDrop,
    MustDropPrefill,
    budget_schedule,
    layer_spans,
    scaled_layers,
)


def test_release_layers_on_32_layers_and_scaled_elsewhere():
    assert scaled_layers(32) == [2, 6, 10, 14]  # the release's exact layers on LLaVA-1.5-7B's Vicuna
    assert scaled_layers(6) == [0, 1, 2]  # the shipped models
    assert scaled_layers(28) == [2, 5, 9, 12] and scaled_layers(16) == [1, 3, 5, 7] and scaled_layers(2) == [0]
    for depth in range(2, 81):
        layers = scaled_layers(depth)
        assert layers == sorted(set(layers)) and 0 <= layers[0] and layers[-1] <= depth - 2
        # each release layer has a drop after the nearest share of the depth (within half a layer; or clamped)
        for theirs in (2, 6, 10, 14):
            ideal = (theirs + 1) * depth / 32  # layers run before the release's drop, at this depth
            assert any(abs((m + 1) - ideal) <= 0.5 or (m == 0 and ideal < 1) or (m == depth - 2 and ideal > m)
                       for m in layers), (depth, layers, theirs)
    with pytest.raises(tr.PlanError, match="1-layer decoder"):
        scaled_layers(1)
    assert MustDropPrefill().acts_after(32) == [2, 6, 10, 14] and MustDropPrefill().acts_after(4) == [0, 1]


def test_explicit_layers_still_win_and_are_checked():
    assert MustDropPrefill(layers=[1, 3]).acts_after(6) == [1, 3]
    with pytest.raises(tr.PlanError, match=r"layers=\[2, 6, 10, 14\] but the decoder has 6 layers.*\[0, 1, 2\]"):
        MustDropPrefill(layers=[2, 6, 10, 14]).acts_after(6)


def _exhaustive(n0: int, protected: int, spans: list[int], total: int) -> bool:
    """Whether any non-increasing counts in [protected, n0] meet `total` exactly (brute force)."""
    w = spans[1:]
    rest = total - spans[0] * n0
    for counts in itertools.combinations_with_replacement(range(n0, protected - 1, -1), len(w)):
        if sum(a * b for a, b in zip(w, counts)) == rest:
            return True
    return False


@pytest.mark.parametrize("depth", [4, 6, 12, 32])
def test_schedule_is_exact_whenever_a_schedule_can_be(depth):
    layers = scaled_layers(depth)
    spans = layer_spans(layers, depth)
    assert sum(spans) == depth
    for n0, protected in ((16, 0), (16, 3), (25, 2)):
        floor = spans[0] * n0 + sum(spans[1:]) * protected
        for total in range(floor, n0 * depth + 1):
            counts = budget_schedule(n0, protected, spans, total)
            assert all(a >= b for a, b in zip([n0, *counts], counts)) and min(counts) >= protected
            got = spans[0] * n0 + sum(a * b for a, b in zip(spans[1:], counts))
            assert got <= total
            if got != total:  # only where no schedule at all is exact
                assert not _exhaustive(n0, protected, spans, total), (n0, protected, total, counts)
        with pytest.raises(tr.BudgetError, match="out of reach"):
            budget_schedule(n0, protected, spans, floor - 1)


def test_schedule_on_llava_15_widths():
    """576 tokens, the release's layers on 32 layers: the papers' averages are met exactly. A key set of 47 tokens
    (8%) kept through all 29 late layers puts the floor at 96.6 tokens per layer."""
    spans = layer_spans([2, 6, 10, 14], 32)
    assert spans == [3, 4, 4, 4, 17]
    for average, key_set in ((192, 47), (128, 47), (99, 47), (300, 47), (64, 0), (55, 0)):
        counts = budget_schedule(576, key_set, spans, average * 32)
        assert 3 * 576 + sum(a * b for a, b in zip(spans[1:], counts)) == average * 32
        assert counts == sorted(counts, reverse=True)
    with pytest.raises(tr.BudgetError, match="cannot go below 96.6"):
        budget_schedule(576, 47, spans, 64 * 32)
    counts = budget_schedule(576, 0, spans, 128 * 32)
    assert counts[0] > counts[-1] and counts[1] / counts[0] == pytest.approx(counts[2] / counts[1], abs=0.1)


def _call(model, plan, x, mask, vis, protected=None, generate=0):
    return run(model, tr.Plan.parse(plan).at(tr.Stage.PREFILL), tr.Plan.parse(plan).at(tr.Stage.DECODE), x=x,
               mask=mask, vis=vis, protected=protected, generate=generate)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("budget", ["tokens=5", "tokens=9", "keep=0.5", "keep=0.3"])
def test_budget_met_exactly_and_counted_from_the_tensors(family, budget):
    """A batch of three samples with 16, 12 and 8 visual tokens on a 4-layer decoder (default layers [0, 1]): each
    sample's visual tokens summed over the layers equal its target, and the counts are the KV caches' real sizes."""
    x, mask, vis = batch()
    model = tiny(family)
    reducer = tr.Plan.parse(f"mustdrop-prefill({budget})").reducers[0]
    out, rec = _call(model, f"mustdrop-prefill({budget})+mustdrop-decode", x, mask, vis)
    assert rec.drop_layers == [0, 1] and rec.cut_layers == [0, 1]
    for b, (_, (a, z)) in enumerate(SAMPLES):
        total = min(reducer.target_total(z - a, 4), 4 * (z - a))  # a target above n0 keeps every token
        assert sum(layer[b] for layer in rec.visual_per_layer) == total, (b, rec.visual_per_layer)
    cache = out.past_key_values
    for layer in range(4):
        assert cache.layers[layer].keys.shape[2] == rec.kv_length[layer]  # the record is the tensor's size
        for b in range(3):
            real = int((rec.positions[layer][b] >= 0).sum())
            assert real == rec.kv_tokens[layer][b]
            # layers 2-3 hold what entered them; 0-1 were cut to the final survivors (mustdrop-decode)
            assert real == rec.tokens_per_layer[layer if layer >= 2 else 3][b]


def test_an_unreachable_budget_is_a_clear_error():
    x, mask, vis = batch()
    with pytest.raises(tr.BudgetError, match="out of reach.*cannot go below"):
        _call(tiny(), "mustdrop-prefill(tokens=1)", x, mask, vis)


def test_budget_form_keeps_what_the_threshold_rule_keeps_at_its_count():
    """At one pruning layer, a budget equal to the threshold rule's own result keeps the same tokens: same counts
    and the same logits at every kept position."""
    x, mask, vis = batch()
    model = tiny()
    thr = "mustdrop-prefill(layers=[1], global_thr=0.9, individual_thr=0.2)"
    out_thr, rec_thr = _call(model, thr, x, mask, vis)
    kept = rec_thr.visual_per_layer[2]
    assert any(k < z - a for k, (_, (a, z)) in zip(kept, SAMPLES)) and all(k > 0 for k in kept)  # it drops some
    for b, (_, (a, z)) in enumerate(SAMPLES):
        n0, total = z - a, 2 * (z - a) + 2 * kept[b]  # layers 0-1 see all, 2-3 the survivors
        keep = total / (4 * n0)
        xb, mb, vb = x[b:b + 1], mask[b:b + 1], vis[b:b + 1]
        out_b, rec_b = _call(model, f"mustdrop-prefill(layers=[1], global_thr=0.9, individual_thr=0.2, keep={keep})",
                             xb, mb, vb)
        assert rec_b.visual_per_layer[2] == [kept[b]]
        torch.testing.assert_close(rec_b.positions[3][0], rec_thr.positions[3][b][-rec_b.positions[3].shape[1]:])
        torch.testing.assert_close(out_b.logits[0, -1], out_thr.logits[b, -1], rtol=1e-4, atol=1e-5)


def test_protected_tokens_are_kept_and_bound_the_schedule():
    x, mask, vis = batch()
    protected = torch.zeros_like(vis)
    for b in range(3):
        protected[b, torch.nonzero(vis[b]).flatten()[:3]] = True  # the key set: 3 tokens per sample
    _, rec = _call(tiny(), "mustdrop-prefill(tokens=7)", x, mask, vis, protected=protected)
    for b, (_, (a, z)) in enumerate(SAMPLES):
        n0 = z - a
        counts = budget_schedule(n0, 3, layer_spans([0, 1], 4), 28)
        assert [rec.visual_per_layer[layer][b] for layer in range(4)] == [n0, counts[0], counts[1], counts[1]]
        slots = set(rec.positions[3][b].tolist())
        assert set(torch.nonzero(protected[b]).flatten().tolist()) <= slots


def test_budget_arguments_are_checked():
    with pytest.raises(tr.BudgetError, match="either tokens= or keep="):
        MustDropPrefill(tokens=3, keep=0.5)
    with pytest.raises(tr.BudgetError, match="keep= must be a fraction"):
        MustDropPrefill(keep=1.5)
    with pytest.raises(tr.BudgetError, match="tokens= must be a positive integer"):
        MustDrop(tokens=0)
    with pytest.raises(tr.BudgetError, match="preset= .* or a budget"):
        MustDrop(preset=64, tokens=64)
    parts = MustDrop(keep=0.25).parts()
    assert parts[1].keep == 0.25 and parts[1].layers is None and parts[2].layers is None


# --- through the VLMs ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    from tokenreduce.loading import load_model

    return {kind: load_model("default", kind) for kind in ("image", "video")}


def _image_inputs(loaded):
    import numpy as np
    from tokenreduce.eval import models as M
    from tokenreduce.eval import protocols as P
    from tokenreduce.eval.synthetic import generate_images

    s = generate_images(2, seed=0, split="test")
    prompts = [P.build_prompt("mlvu", x.question.question, x.question.options, "image") for x in s]
    return M.encode(loaded.tokenizer, loaded.model, prompts, np.stack([x.image for x in s]))


def _video_inputs(loaded):
    import numpy as np
    from tokenreduce.eval import models as M
    from tokenreduce.eval import protocols as P
    from tokenreduce.eval.synthetic import generate_videos

    from tokenreduce.video import uniform_indices

    vids = generate_videos(2, seed=0, split="test")
    frames = np.stack([v.render()[uniform_indices(M.NUM_FRAMES, v.n_frames)] for v in vids])
    prompts = [P.build_prompt("videomme", v.question.question, v.question.options, "video") for v in vids]
    return M.encode(loaded.tokenizer, loaded.model, prompts, frames)


@pytest.mark.parametrize("kind, plan", [("image", "mustdrop"), ("video", "mustdrop-prefill+mustdrop-decode")])
def test_plain_mustdrop_runs_on_both_shipped_models(shipped, kind, plan):
    """The default layers fit the 6-layer decoders (0/1/2): the plain plan runs and drops at those layers."""
    loaded = shipped[kind]
    x = _image_inputs(loaded) if kind == "image" else _video_inputs(loaded)
    with torch.no_grad(), tr.apply(loaded.model, plan, tokenizer=loaded.tokenizer) as h:
        loaded.model.generate(**x, max_new_tokens=2, do_sample=False)
    call = h.report.calls[0]
    assert len(call.llm_visual) == 6  # counts of the visual tokens entering each decoder layer
    for layer in (4, 5):  # nothing drops after layer 3: the drops are after layers 0, 1 and 2
        assert call.llm_visual[layer] == call.llm_visual[3]


@pytest.mark.parametrize("keep", [0.5, 0.25])
def test_mustdrop_budget_on_the_shipped_image_model(shipped, keep):
    """The whole method (vision merge + key set + budgeted prefill + KV cut) on the trained image model: the layer
    average is the target of the tokens that entered the LLM, per sample of a batch."""
    loaded = shipped["image"]
    x = _image_inputs(loaded)
    with torch.no_grad(), tr.apply(loaded.model, f"mustdrop(keep={keep})") as h:
        loaded.model.generate(**x, max_new_tokens=2, do_sample=False)
    call = h.report.calls[0]
    for b, n0 in enumerate(call.tokens()):
        assert call.llm_visual[0][b] == n0
        assert sum(layer[b] for layer in call.llm_visual) == int(keep * n0 * 6 + 0.5)
        assert call.visual_layer_average[b] == pytest.approx(int(keep * n0 * 6 + 0.5) / 6)


def test_mustdrop_budget_composes_with_a_visual_reducer(shipped):
    """pool to 32 tokens before the LLM, then MustDrop's LLM stages to an average of 12: both budgets hold."""
    loaded = shipped["image"]
    x = _image_inputs(loaded)
    with torch.no_grad(), tr.apply(loaded.model, "pool(tokens=32)+mustdrop-prefill(tokens=12)+mustdrop-decode") as h:
        loaded.model.generate(**x, max_new_tokens=2, do_sample=False)
    call = h.report.calls[0]
    assert call.tokens() == [32, 32] and [col[0] for col in zip(*call.llm_visual)] == [32, 32]
    assert call.visual_layer_average == [12.0, 12.0]
