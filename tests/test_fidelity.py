"""Merging and budgets against transcriptions of the releases (issue 20, "faithful merging"): AIM, QuoTA, HiRED.

`release_merge` below is our own transcription of what the release's ``bipartite_soft_matching_merge`` does
(dragonlzm/AIM and LaVi-Lab/AIM, ``llava/model/token_merge.py``; schedules in ``llava_arch.py get_2dPool`` and
the LLaVA-1.5 ``clip_encoder.py``), written from reading it: tokens at even positions are sources, at odd
positions destinations; r = min(r, t // 2); each source's best destination by cosine of the unit-normalised
metric; the r best-matched sources (descending similarity) are averaged into their destinations together with
the destination itself (an unweighted mean); the output is [unmerged sources in descending-similarity order,
every destination in order]. It carries a membership matrix through the merges so tests can compare groups.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_image, prompt

import tokenreduce as tr
from tokenreduce.merge.aim import KEYS, AIMMerge, bipartite_merge
from tokenreduce.prune.hired import HiRED
from tokenreduce.prune.quota import QuoTA, grid_shape
from tokenreduce.video import DynamicSampling, load_video, uniform_indices, write_video


def release_merge(metric: torch.Tensor, r: int, x: torch.Tensor) -> torch.Tensor | None:
    """One call of the release's merge on (n, t, *) tensors; None when r <= 0 (as the release returns)."""
    t = metric.shape[1]
    r = min(r, t // 2)
    if r <= 0:
        return None
    unit = metric / metric.norm(dim=-1, keepdim=True)
    sim = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)
    best, dst_of_src = sim.max(dim=-1)
    ranked = best.argsort(dim=-1, descending=True)
    merged, unmerged = ranked[:, :r], ranked[:, r:]
    src, dst = x[:, ::2], x[:, 1::2]
    c = x.shape[-1]
    out_dst = dst.scatter_reduce(1, dst_of_src.gather(1, merged)[..., None].expand(-1, -1, c),
                                 src.gather(1, merged[..., None].expand(-1, -1, c)), reduce="mean", include_self=True)
    return torch.cat([src.gather(1, unmerged[..., None].expand(-1, -1, c)), out_dst], 1)


def release_schedule(feats: torch.Tensor, rs: list[int], metric: torch.Tensor | None = None):
    """The release's calls with r in `rs`; returns (features, groups) with groups[b][j] = members of token j."""
    n, t, d = feats.shape
    x = torch.cat([feats.double(), torch.eye(t, dtype=torch.float64).expand(n, t, t)], -1)  # features + membership
    m = feats.double() if metric is None else metric.double()
    for r in rs:
        out = release_merge(m if metric is not None else x[..., :d], r, x)
        if metric is not None:
            m = release_merge(m, r, m)  # the LLaVA-1.5 path merges the keys with themselves, in lock-step
        x = out
    groups = [[frozenset(torch.nonzero(row > 0).flatten().tolist()) for row in item[:, d:]] for item in x]
    return x[..., :d].float(), groups


def our_groups(vt: tr.VisualTokens) -> list[list[frozenset[int]]]:
    """Per item (items of equal size), the members (indices within the item) of its tokens, in LLM order."""
    order = torch.argsort(vt.position, stable=True).tolist()
    per_item = vt.num_original // vt.num_items
    out = []
    for i in range(vt.num_items):
        toks = [j for j in order if int(vt.item[j]) == i]
        out.append([frozenset((torch.nonzero(vt.source == j).flatten() - i * per_item).tolist()) for j in toks])
    return out


def frames(n: int, grid: int, d: int = 24, seed: int = 0) -> tr.VisualTokens:
    """n frames of grid x grid tokens with spatially smooth features (neighbours alike, as in real frames)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, d, grid // 2 + 1, grid // 2 + 1, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(grid, grid), mode="bilinear", align_corners=False)
    feats = smooth + 0.3 * torch.randn(n, d, grid, grid, generator=g)
    feats = feats.flatten(2).transpose(1, 2)  # (n, grid*grid, d), raster order
    items = [tr.tokens.ItemInfo(image=0, kind="frame", index=f) for f in range(n)]
    return tr.VisualTokens.from_items(list(feats), [(grid, grid)] * n, torch.arange(n * grid * grid) + 3, items)


def reduce(reducer, vt):
    return reducer.reduce([vt], [tr.Context()])[0]


def test_video_schedule_gives_the_release_groups_and_order():
    """32 frames x 196 tokens: keep=0.25 is the release's r=98, r=49 (every source merged in both calls)."""
    vt = frames(32, 14)
    want_feats, want = release_schedule(torch.stack(list(vt.features.view(32, 196, -1))), [98, 49])
    out = reduce(AIMMerge(keep=0.25), vt)
    assert len(out) == 32 * 49
    assert our_groups(out) == want
    order = torch.argsort(out.position, stable=True)
    torch.testing.assert_close(out.features[order].view(32, 49, -1), want_feats, atol=1e-5, rtol=1e-5)


def test_keep_half_twice_is_the_video_schedule():
    vt = frames(32, 14, seed=1)
    _, want = release_schedule(vt.features.view(32, 196, -1), [98, 49])
    once = reduce(AIMMerge(keep=0.5), vt)
    twice = reduce(AIMMerge(keep=0.5), once)
    assert len(twice) == 32 * 49
    assert our_groups(twice) == want
    assert our_groups(twice) == our_groups(reduce(AIMMerge(keep=0.25), vt))


def test_odd_counts_round_and_order_are_the_documented_deviations():
    """729 tokens (a 27x27 frame) at 25%: the release's r = 729//2, 729//4 leave 183 tokens, keep=0.25 gives 182
    (the budget is met exactly); tokens=183 with order='release' reproduces the release's groups, whose second
    call splits the shuffled sequence [unmerged source, destinations...]; order='spatial' keeps the source in
    place and so pairs differently."""
    vt = frames(2, 27, seed=2)
    x = vt.features.view(2, 729, -1)
    _, want = release_schedule(x, [729 // 2, 729 // 4])
    assert [len(w) for w in want] == [183, 183]
    assert len(reduce(AIMMerge(keep=0.25), frames(1, 27, seed=2))) == 182
    release = reduce(AIMMerge(tokens=366, order="release"), vt)
    assert [sorted(g, key=min) for g in our_groups(release)] == [sorted(w, key=min) for w in want]
    spatial = reduce(AIMMerge(tokens=366), vt)
    assert len(spatial) == 366
    assert [set(g) for g in our_groups(spatial)] != [set(w) for w in want]
    # after the first call (365 tokens: every destination got its sources, one source left) both agree
    _, first = release_schedule(x, [729 // 2])
    assert [set(g) for g in our_groups(reduce(AIMMerge(tokens=730), vt))] == [set(w) for w in first]


@pytest.mark.parametrize("order", ["spatial", "release"])
def test_bipartite_merge_groups_equal_the_release_on_halving_schedules(order):
    x = torch.randn(3, 64, 16, generator=torch.Generator().manual_seed(3))
    for rs, target in (([32], 32), ([32, 16], 16), ([32, 16, 8], 8), ([32, 4], 28)):
        _, want = release_schedule(x, rs)
        res = bipartite_merge(x, target, order=order)
        got = [[frozenset(torch.nonzero(res.assign[b] == j).flatten().tolist()) for j in range(target)]
               for b in range(3)]
        if order == "release" or rs in ([32], [32, 16], [32, 16, 8]):  # every source merged: same order too
            assert got == want
        assert [set(g) for g in got] == [set(w) for w in want]


def test_keys_metric_gives_the_llava15_release_groups_on_a_model(processor):
    """metric='keys' on the tiny LLaVA: the groups of the release's LLaVA-1.5 schedule (576 -> 288 -> 252 there,
    here 64 -> 32 -> 28: r = t/2 then t/16), computed on the keys of the layer after the feature layer (CLS
    dropped), keys merged in lock-step."""
    from tokenreduce.adapters.llava.zoo import build_llava

    model = build_llava("tiny", seed=0)
    x = processor(text=prompt("What is this?"), images=make_image(7), return_tensors="pt")
    tower = model.model.vision_tower
    seen = {}
    hook = tower.encoder.layers[1].self_attn.k_proj.register_forward_hook(
        lambda m, a, o: seen.__setitem__("k", o))
    with torch.no_grad():
        hidden = tower(x["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
    hook.remove()
    keys = seen["k"][:, 1:]
    _, want = release_schedule(hidden, [32, 4], metric=keys)
    with torch.no_grad(), tr.apply(model, "aim-merge(tokens=28, metric='keys')") as h:
        model(**x)
    vt = h.report.calls[0].visual[0]
    # the groups are the release's; their order is not (12 of 16 sources stay unmerged in the second call,
    # and a merged token enters the LLM at its destination's place: the documented deviation)
    assert [set(g) for g in our_groups(vt)] == [set(w) for w in want]
    assert KEYS in vt.scores and vt.scores[KEYS].shape == (28, keys.shape[-1])
    with torch.no_grad(), tr.apply(model, "aim-merge(tokens=28)") as h:
        model(**x)
    assert [set(g) for g in our_groups(h.report.calls[0].visual[0])] != [set(w) for w in want]  # the metric matters


def test_keys_metric_needs_tower_keys_of_the_features():
    """A tower whose features come from its last layer has no layer that computes keys from them: a clear error."""
    vt = frames(2, 4)
    with pytest.raises(tr.UnsupportedModelError, match="no vision-tower keys"):
        reduce(AIMMerge(keep=0.5, metric="keys"), vt)
    from tokenreduce.adapters.videollm import video_inputs
    from tokenreduce.adapters.videollm.zoo import build_video_llm

    from tokenreduce.registry import adapter_for

    model, tok = build_video_llm("tiny-onevision")
    spec = adapter_for(model)(model).video_spec()
    clip = (torch.rand(4, 64, 64, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    x = video_inputs(tok, spec, ["USER: <video>\nWhat moves? ASSISTANT:"], [clip])
    with torch.no_grad(), tr.apply(model, "aim-merge(keep=0.5, metric='keys')"):
        with pytest.raises(tr.UnsupportedModelError, match="keys"):
            model(**x)


# ----------------------------------------------------------------------------------------------------------------
# QuoTA: grid shapes and short-clip sampling (MAC-AutoML/QuoTA core/llava_arch.py token_compress v1,
# quota_pipeline.py process_video_prune)
# ----------------------------------------------------------------------------------------------------------------


def release_grid(n: int) -> tuple[int, int]:
    """QuoTA v1's grid for a share of n tokens: floor(sqrt(n)) square, one more row (else column) if it fits."""
    h = w = int(math.sqrt(n))
    if h * w < n:
        if (h + 1) * w <= n:
            h += 1
        elif h * (w + 1) <= n:
            w += 1
    return h, w


def release_frames(total: int, fps: float, base: int = 96, alpha: int = 64) -> list[int]:
    """QuoTA's frames: base + int(duration / 3600 * alpha), linspace over the clip, forced (repeats allowed)."""
    count = base + int(total / fps / 3600 * alpha)
    return np.linspace(0, total - 1, count, dtype=int).tolist()


def test_quota_release_grid_shapes():
    for n in range(1, 196):
        assert grid_shape(n, 14, 14, "release") == release_grid(n)
    assert grid_shape(130, 14, 14, "release") == (11, 11) and grid_shape(30, 14, 14, "release") == (6, 5)
    # the default fills the share (the documented deviation), and no grid grows beyond the frame's
    assert grid_shape(130, 14, 14) == (10, 13) and grid_shape(30, 14, 14) == (5, 6)
    assert grid_shape(800, 27, 27, "release") == (27, 27)  # the release would upsample to 28 x 28
    with pytest.raises(tr.PlanError, match="grid must be"):
        QuoTA(keep=0.5, grid="square")


def test_quota_release_grids_in_the_reducer():
    vt = frames(3, 14, seed=4)
    out = QuoTA(tokens=3 * 130, scorer="uniform", grid="release").reduce_sample(vt, tr.Context())
    assert out.item_counts().tolist() == [121, 121, 121]
    out = QuoTA(tokens=3 * 130, scorer="uniform").reduce_sample(vt, tr.Context())
    assert out.item_counts().tolist() == [130, 130, 130]


def release_v1(raw: torch.Tensor, shares: list[int]) -> list[torch.Tensor]:
    """QuoTA v1 on (T, S, S, D) projected frames: each frame bilinear-resized to its share's release grid."""
    out = []
    for frame, n in zip(raw, shares):
        h, w = release_grid(n)
        grid = torch.nn.functional.interpolate(frame.permute(2, 0, 1)[None], size=(h, w), mode="bilinear")
        out.append(grid[0].flatten(1).T)
    return out


def smooth_grid(t: int, side: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(t, d, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear").permute(0, 2, 3, 1)


def test_quota_resizes_from_the_raw_grid_like_the_release():
    """LLaVA-OneVision: frames are 27x27 projected tokens that the model pools to 14x14; QuoTA's release resizes
    the 27x27 grid. Given the raw grids (Context.raw_grids), quota does the same: 3 frames sharing 3 x 130 tokens
    give the release's 11x11 grids, interpolated from 27x27, not from the pooled 14x14."""
    raw = smooth_grid(3, 27, 16, seed=7)
    pooled = torch.nn.functional.interpolate(raw.permute(0, 3, 1, 2), size=(14, 14), mode="bilinear")
    pooled = pooled.permute(0, 2, 3, 1).reshape(3, 196, 16)
    items = [tr.tokens.ItemInfo(image=0, kind="frame", index=f) for f in range(3)]
    vt = tr.VisualTokens.from_items(list(pooled), [(14, 14)] * 3, torch.arange(3 * 196), items)
    quota = QuoTA(tokens=3 * 130, scorer="uniform", grid="release")
    out = quota.reduce_sample(vt, tr.Context(raw_grids=raw))
    want = release_v1(raw, [130] * 3)
    torch.testing.assert_close(out.features, torch.cat(want), atol=1e-5, rtol=1e-5)
    from_pooled = quota.reduce_sample(vt, tr.Context())  # no raw grids: resized from what the LLM sees
    rel = (from_pooled.features - out.features).norm() / out.features.norm()
    assert rel > 0.01, f"resizing from the pooled grid should differ from the raw one, got {rel:.4f}"
    # a frame that keeps its whole pooled grid keeps the model's own pooled tokens
    full = QuoTA(keep=1.0, scorer="uniform").reduce_sample(vt, tr.Context(raw_grids=raw))
    assert torch.equal(full.features, vt.features)
    with pytest.raises(tr.UnsupportedModelError, match="raw grids"):
        quota.reduce_sample(vt, tr.Context(raw_grids=raw[:2]))


def test_quota_reads_the_models_raw_grids():
    """On the tiny LLaVA-OneVision the frames quota returns are the model's own pre-pool grids, resized."""
    from tokenreduce.adapters.videollm import video_inputs
    from tokenreduce.adapters.videollm.zoo import build_video_llm

    from tokenreduce.registry import adapter_for

    model, tok = build_video_llm("tiny-onevision")
    spec = adapter_for(model)(model).video_spec()
    clip = (torch.rand(4, 64, 64, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    x = video_inputs(tok, spec, ["USER: <video>\nWhat moves? ASSISTANT:"], [clip])
    seen = {}

    def scorer(pixels, question, ctx):
        seen["raw"] = ctx.raw_grids
        return torch.ones(pixels.shape[0])

    with torch.no_grad(), tr.apply(model, tr.Plan([QuoTA(keep=0.5, scorer=scorer, grid="release")])) as h:
        model(**x)
    raw = seen["raw"]
    assert raw is not None and raw.shape[1] > 4  # finer than the pooled grid
    vt = h.report.calls[0].visual[0]
    per = vt.item_counts().tolist()
    share = h.report.calls[0].visual[0].num_original // vt.num_items // 2
    want = release_v1(raw, [share] * vt.num_items)
    assert per == [w.shape[0] for w in want]
    got = vt.features[torch.argsort(vt.position, stable=True)]
    torch.testing.assert_close(got, torch.cat(want).to(got.dtype), atol=1e-5, rtol=1e-5)


def test_quota_short_clip_sampling(tmp_path):
    """A 60-frame clip: the release samples 96 frames with repeats; we sample the 60 there are, or the
    release's 96 with DynamicSampling(repeat=True)."""
    assert uniform_indices(96, 60, allow_repeats=True).tolist() == release_frames(60, 30.0)
    path = tmp_path / "short.mp4"
    frames_ = np.zeros((60, 32, 32, 3), dtype=np.uint8)
    frames_[:, :, :, 0] = np.arange(60, dtype=np.uint8)[:, None, None] * 4  # each frame its own red level
    write_video(path, frames_, fps=30)
    ours = load_video(path, dynamic=True)
    assert len(ours) == 60 and ours.indices.tolist() == list(range(60))
    faithful = load_video(path, dynamic=DynamicSampling(repeat=True))
    assert faithful.indices.tolist() == release_frames(60, 30.0) and len(faithful) == 96


# ----------------------------------------------------------------------------------------------------------------
# HiRED: the budget's rounding (hasanar1f/HiRED modeling_llava.py / modeling_llava_next.py HiRED_token_selection)
# ----------------------------------------------------------------------------------------------------------------


def release_hired_total(partitions: int, rate: float, per: int = 576) -> int:
    """The release's budget: int(partitions * 576 * rate) (a single partition: min(576, int(576 * rate)))."""
    return min(per, int(per * rate)) if partitions == 1 else int(partitions * per * rate)


@pytest.mark.parametrize("keep, ours, release", [(0.2, 115, 115), (0.4, 230, 230), (0.3, 173, 172), (0.55, 317, 316)])
def test_hired_rounds_the_budget_where_the_release_truncates(keep, ours, release):
    vt = frames(1, 24, seed=5)
    g = torch.Generator().manual_seed(6)
    vt = vt.with_scores(**{"cls@0": torch.rand(576, generator=g), "cls@feature": torch.rand(576, generator=g)})
    assert release_hired_total(1, keep) == release
    assert len(HiRED(keep=keep).reduce_sample(vt, tr.Context())) == ours
    assert len(HiRED(tokens=release).reduce_sample(vt, tr.Context())) == release  # tokens= gives any count
    for rate in (0.2, 0.4):  # the paper's settings agree on a 5-partition (2880-token) image too
        assert release_hired_total(5, rate) == HiRED(keep=rate).budget(2880)
