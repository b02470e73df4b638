"""In-LLM pruning reducers: AIM PageRank pruning (aim-prune) and MustDrop's prefill and decode stages.

Scores and decisions are checked against direct dense computations from eager attention weights
(`output_attentions=True` on an untouched model), on tiny Llama/Qwen2 decoders built from config.
"""

from __future__ import annotations

import math

import pytest
import torch
from decoders import FAMILIES, tiny  # noqa: E402,F401

import tokenreduce as tr
from tokenreduce.errors import PlanError
from tokenreduce.llm import CacheState, LayerView, PrefillEngine
from tokenreduce.prune.aim_prune import AIMPrune, pagerank
from tokenreduce.prune.mustdrop import MustDropDecode, MustDropPrefill, dual_attention_drop

# three samples: (length, visual span); left-padded into one batch
SAMPLES = [(24, (3, 19)), (19, (2, 14)), (15, (4, 12))]


def batch(dtype=torch.float32):
    width = max(n for n, _ in SAMPLES)
    xs, masks, vis = [], [], []
    for seed, (n, (a, b)) in enumerate(SAMPLES):
        x = torch.randn(1, n, 64, generator=torch.Generator().manual_seed(20 + seed))
        pad = width - n
        xs.append(torch.cat([torch.zeros(1, pad, 64), x], 1))
        masks.append(torch.cat([torch.zeros(pad), torch.ones(n)]).long())
        v = torch.zeros(width, dtype=torch.bool)
        v[pad + a: pad + b] = True
        vis.append(v)
    return torch.cat(xs).to(dtype), torch.stack(masks), torch.stack(vis)


def run(model, prefill, decode=(), x=None, mask=None, vis=None, protected=None, generate=0):
    """Run one armed call (forward, or generate with `generate` new tokens); returns (output, engine record)."""
    e = PrefillEngine(model.model, prefill, decode)
    e.install()
    try:
        e.arm(vis, protected)
        with torch.no_grad():
            if generate:
                out = model.generate(inputs_embeds=x, attention_mask=mask, max_new_tokens=generate, do_sample=False)
            else:
                pos = (mask.cumsum(-1) - 1).clamp(min=0) if mask is not None else None
                out = model(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=True)
    finally:
        e.remove()
    return out, e.last


def kept_slots(record, layer: int) -> list[list[int]]:
    """Per sample, the input slots held by `layer`'s cache, relative to the sample's first real slot."""
    width = record.positions[0].shape[1]
    pads = [width - n for n, _ in SAMPLES]
    return [[s - pads[b] for s in row.tolist() if s >= 0] for b, row in enumerate(record.positions[layer])]


def eager_weights(model_family: str, x, mask, layer: int) -> torch.Tensor:
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return tiny(model_family, "eager")(inputs_embeds=x, attention_mask=mask, position_ids=pos,
                                           output_attentions=True).attentions[layer].double()


# ------------------------------------------------------------------------------------------------ AIM


def test_aim_schedules_match_the_release():
    aim = AIMPrune()
    seen32 = [1.0] + aim.retention(32)[:-1]  # fraction of visual tokens seen by layer j
    assert seen32 == [1.0] * 14 + [1 - k / 8 for k in range(1, 8)] + [0.0] * 11
    seen28 = [1.0] + aim.retention(28)[:-1]
    assert seen28[:15] == [1.0] * 15 and seen28[15] == 0.875 and seen28[21] == 0.125 and seen28[22:] == [0.0] * 6
    assert aim.acts_after(32) == list(range(13, 21))
    assert [layer for layer in aim.acts_after(32) if aim.wants_attention(layer, 32)] == list(range(13, 20))
    assert aim.acts_after(28) == list(range(14, 22))
    assert AIMPrune(start=0.5, step=0.5).retention(4) == [1.0, 1.0, 0.5, 0.0]
    assert AIMPrune(start=0).acts_after(2) == [0]  # a 2-layer model drops after layer 0
    assert AIMPrune().acts_after(4) == [1, 2]  # default for other depths: floor(0.45 * depth)


@pytest.mark.parametrize("kwargs,field", [({"start": -1}, "start"), ({"start": 1.5}, "start"),
                                           ({"step": 0}, "step"), ({"tau": -1.0}, "tau"), ({"iters": 0}, "iters"),
                                           ({"damping": 1.0}, "damping"), ({"start": "x"}, "start")])
def test_aim_validation_names_the_field(kwargs, field):
    with pytest.raises(PlanError, match=f"aim-prune: {field}="):
        AIMPrune(**kwargs)
    with pytest.raises(PlanError, match="start=20"):
        AIMPrune(start=20).acts_after(4)


def test_pagerank_equals_dense_reference():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 6, 6, generator=g), -1)
    valid = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    got = pagerank(probs, valid, iters=5)
    for b in range(2):
        pi0 = valid[b].double() / valid[b].sum()
        pis = torch.stack([pi0 @ torch.linalg.matrix_power(probs[b, h].double(), 5) for h in range(3)])
        torch.testing.assert_close(got[b].double(), pis.pow(2).mean(0).sqrt(), atol=1e-7, rtol=1e-5)
    damped = pagerank(probs, valid, iters=2, damping=0.2)
    pi = valid[0].double() / 6
    ref = torch.stack([(0.8 * ((0.8 * (pi @ probs[0, h].double()) + 0.2 * pi) @ probs[0, h].double()) + 0.2 * pi)
                       for h in range(3)])
    torch.testing.assert_close(damped[0].double(), ref.pow(2).mean(0).sqrt(), atol=1e-7, rtol=1e-5)


class SpyAIM(AIMPrune):
    def importance(self, view: LayerView) -> torch.Tensor:
        score = super().importance(view)
        self.seen = getattr(self, "seen", {})
        self.seen[view.layer] = score
        return score


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa")])
def test_aim_scores_and_kept_sets_equal_a_direct_computation(family, attn):
    """Scores at the first pruning layer from softmax(Z / tau) = normalised eager weights ** (1 / tau)."""
    x, mask, vis = batch()
    aim = SpyAIM()
    _, rec = run(tiny(family, attn), [aim], x=x, mask=mask, vis=vis)
    assert aim.acts_after(4) == [1, 2]
    w = eager_weights(family, x, mask, 1)  # (B, H, L, L)
    m = w.pow(1 / aim.tau)
    m = m / m.sum(-1, keepdim=True)
    valid = mask.bool()
    pi = (valid.double() / valid.sum(1, keepdim=True))[:, None, None, :].expand(-1, 4, -1, -1)
    for _ in range(5):
        pi = pi @ m
    ref = pi[:, :, 0].pow(2).mean(1).sqrt()
    got = aim.seen[1].double()
    torch.testing.assert_close(got * valid, ref * valid, atol=1e-6, rtol=1e-4)
    # kept after layer 1: every text token, and the floor(n * 0.875) best visual tokens of each sample
    n0 = vis.sum(1)
    for b in range(3):
        budget = math.floor(int(n0[b]) * 0.875)
        best = torch.argsort(ref[b].masked_fill(~vis[b], -1), descending=True, stable=True)[:budget]
        expect = sorted(set(torch.nonzero(valid[b] & ~vis[b]).flatten().tolist()) | set(best.tolist()))
        assert [s for s in rec.positions[2][b].tolist() if s >= 0] == expect
    assert [row for row in zip(*rec.visual_per_layer)] == [
        (n, n, math.floor(n * 0.875), math.floor(n * 0.75)) for n in n0.tolist()
    ]


def test_aim_text_never_dropped_and_rho_zero_drops_all_visual():
    x, mask, vis = batch()
    protected = vis & (torch.arange(vis.shape[1]) % 5 == 0)
    _, rec = run(tiny(), [AIMPrune(start=1, step=0.5)], x=x, mask=mask, vis=vis, protected=protected)
    assert rec.drop_layers == [1, 2] and not AIMPrune(start=1, step=0.5).wants_attention(2, 4)
    text = [set(torch.nonzero(mask[b].bool() & ~vis[b]).flatten().tolist()) for b in range(3)]
    for layer in (2, 3):
        for b in range(3):
            assert text[b] <= set(rec.positions[layer][b].tolist())
    final = [set(row.tolist()) - {-1} for row in rec.final_positions]
    assert final == [text[b] | set(torch.nonzero(protected[b]).flatten().tolist()) for b in range(3)]


def test_aim_batch_equals_single_and_sdpa_equals_eager():
    x, mask, vis = batch()
    width = x.shape[1]
    for attn in ("sdpa", "eager"):
        _, rec = run(tiny("qwen2", attn), [AIMPrune()], x=x, mask=mask, vis=vis)
        if attn == "sdpa":
            first = rec
        else:
            assert all(torch.equal(a, b) for a, b in zip(first.positions, rec.positions))
    for b, (n, _) in enumerate(SAMPLES):
        sl = slice(width - n, width)
        _, single = run(tiny("qwen2", "sdpa"), [AIMPrune()], x=x[b:b + 1, sl], mask=None, vis=vis[b:b + 1, sl])
        for layer in range(4):
            assert [s for s in single.positions[layer][0].tolist()] == kept_slots(first, layer)[b]


# ------------------------------------------------------------------------------------------------ MustDrop


def test_dual_threshold_rule_on_known_attention():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(3 * torch.randn(2, 4, 3, 10, generator=g), -1)
    row_ok = torch.tensor([[True, True, True], [False, True, True]])
    visual = torch.zeros(2, 10, dtype=torch.bool)
    visual[:, 2:8] = True
    protected = torch.zeros_like(visual)
    protected[1, 3] = True
    got = dual_attention_drop(probs, row_ok, visual, protected, global_thr=0.15, individual_thr=0.05)
    for b in range(2):
        a = probs[b].mean(0)[row_ok[b]]  # (T, L)
        gsum = {j: float(a[:, j].sum()) for j in range(2, 8)}
        total = sum(gsum.values())
        expect = [2 <= j < 8 and not protected[b, j] and gsum[j] < 0.15 * total and float(a[:, j].max()) < 0.05
                  for j in range(10)]
        assert got[b].tolist() == expect
    assert got.any() and not got.all()
    # through select(): a view whose attention is the known tensor; text rows = slots 8, 9 (third row padding)
    slots = torch.arange(10).expand(2, -1)
    view = LayerView(layer=2, num_layers=8, hidden=torch.zeros(2, 10, 4), positions=slots, visual=visual,
                     protected=protected, valid=torch.ones(2, 10, dtype=torch.bool), n_visual0=visual.sum(1),
                     after_visual=slots >= 8, max_after=3, probs_fn=lambda rows, t: probs)
    keep = MustDropPrefill(global_thr=0.15, individual_thr=0.05).select(view, None)
    rows_ok = torch.tensor([[True, True, False]] * 2)
    assert keep.tolist() == (~dual_attention_drop(probs, rows_ok, visual, protected, 0.15, 0.05)).tolist()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_mustdrop_prefill_equals_direct_computation(attn):
    x, mask, vis = batch()
    md = MustDropPrefill(layers=[1, 2], global_thr=0.08, individual_thr=0.06)
    _, rec = run(tiny("llama", attn), [md], x=x, mask=mask, vis=vis)
    w = eager_weights("llama", x, mask, 1)
    width = x.shape[1]
    for b, (n, (a, stop)) in enumerate(SAMPLES):
        pad = width - n
        text_rows = list(range(pad + stop, width))
        att = w[b].mean(0)[text_rows]  # (T, L)
        g = att.sum(0)
        vis_idx = list(range(pad + a, pad + stop))
        total = float(g[vis_idx].sum())
        drop = {j for j in vis_idx if g[j] < 0.08 * total and att[:, j].max() < 0.06}
        expect = [s for s in range(pad, width) if s not in drop]
        assert [s for s in rec.positions[2][b].tolist() if s >= 0] == expect
    assert rec.drop_layers and rec.visual_per_layer[3] != rec.visual_per_layer[0]


def test_mustdrop_protected_tokens_are_never_dropped():
    x, mask, vis = batch()
    protected = vis & (torch.arange(vis.shape[1]) % 3 == 0)
    md = MustDropPrefill(layers=[1, 2], global_thr=1.0, individual_thr=1.0)  # drops every unprotected visual token
    _, rec = run(tiny(), [md], x=x, mask=mask, vis=vis, protected=protected)
    assert rec.visual_per_layer[3] == protected.sum(1).tolist()
    for b in range(3):
        assert set(torch.nonzero(protected[b]).flatten().tolist()) <= set(rec.final_positions[b].tolist())


def test_mustdrop_decode_cuts_the_pruning_span():
    """mustdrop-prefill(layers=[1, 2]) + mustdrop-decode on 4 layers: layer 0 full, 1..3 hold the survivors."""
    x, mask, vis = batch()
    plan = tr.Plan.parse("mustdrop-prefill(layers=[1, 2], global_thr=0.08, individual_thr=0.06)+mustdrop-decode")
    model = tiny("llama", "sdpa")
    out, rec = run(model, plan.at(tr.Stage.PREFILL), plan.at(tr.Stage.DECODE), x=x, mask=mask, vis=vis)
    final = rec.final_positions.shape[1]
    assert rec.cut_layers == [1, 2]
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == rec.kv_length == [x.shape[1]] + [final] * 3
    assert rec.kv_tokens[0] == mask.sum(1).tolist()
    for layer in (1, 2, 3):
        assert torch.equal(rec.positions[layer], rec.final_positions)
    assert rec.visual_per_layer[1] != rec.visual_per_layer[3]  # prefill itself was progressive
    # decoding from the cut cache equals each sample alone
    tokens = run(model, plan.at(tr.Stage.PREFILL), plan.at(tr.Stage.DECODE), x=x, mask=mask, vis=vis, generate=4)[0]
    width = x.shape[1]
    for b, (n, _) in enumerate(SAMPLES):
        sl = slice(width - n, width)
        alone = run(model, plan.at(tr.Stage.PREFILL), plan.at(tr.Stage.DECODE), x=x[b:b + 1, sl], vis=vis[b:b + 1, sl],
                    generate=4)[0]
        assert torch.equal(alone[0], tokens[b])


def test_mustdrop_decode_span_and_validation():
    state = CacheState(num_layers=32, positions=[], visual=[], protected=[], valid=[], final=torch.zeros(1, 1),
                       prefill_layers=[2, 6, 10, 14], drop_layers=[])
    assert MustDropDecode().span(state) == list(range(2, 15))
    assert MustDropDecode(layers=[3, 5]).span(state) == [3, 4, 5]
    with pytest.raises(PlanError, match="mustdrop-decode: layers="):
        MustDropDecode(layers=[5, 3])
    with pytest.raises(PlanError, match="mustdrop-prefill: layers="):
        MustDropPrefill(layers=[])
    with pytest.raises(PlanError, match="global_thr="):
        MustDropPrefill(global_thr=-1)
    with pytest.raises(PlanError, match=r"layers=\[2, 6, 10, 14\] but the decoder has 4 layers"):
        PrefillEngine(tiny().model, [MustDropPrefill(layers=[2, 6, 10, 14])])
    assert PrefillEngine(tiny().model, [MustDropPrefill()])._acts.keys() == {0, 1}  # the default scales to depth


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_no_drop_plan_is_bit_identical(attn):
    x, mask, vis = batch()
    model = tiny("llama", attn)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(inputs_embeds=x, attention_mask=mask, position_ids=pos).logits
        tokens = model.generate(inputs_embeds=x, attention_mask=mask, max_new_tokens=4, do_sample=False)
    plan = [MustDropPrefill(layers=[1, 2], global_thr=0.0, individual_thr=0.0)]
    out, rec = run(model, plan, [MustDropDecode()], x=x, mask=mask, vis=vis)
    assert torch.equal(out.logits, logits) and rec.drop_layers == [] and rec.cut_layers == []
    got = run(model, plan, [MustDropDecode()], x=x, mask=mask, vis=vis, generate=4)[0]
    assert torch.equal(got, tokens)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_aim_and_mustdrop_are_finite(dtype):
    x, mask, vis = batch(dtype)
    model = tiny("qwen2", "sdpa", dtype)
    plan = [AIMPrune(), MustDropPrefill(layers=[1], global_thr=0.08, individual_thr=0.06)]
    out, rec = run(model, plan, [MustDropDecode(layers=[1, 2])], x=x, mask=mask, vis=vis)
    assert torch.isfinite(out.logits).all() and rec.drop_layers == [1, 2]
    assert torch.isfinite(out.past_key_values.layers[3].keys).all()
