"""Properties of the reducers themselves, on synthetic VisualTokens (no model)."""

from __future__ import annotations

import pytest
import torch

import tokenreduce as tr
from tokenreduce.merge import AIMMerge, bipartite_merge
from tokenreduce.prune import Pool, RandomDrop, pool_assignment


def tokens(grids, d=8, seed=0, start=5) -> tr.VisualTokens:
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(h * w, d, generator=g) for h, w in grids]
    n = sum(h * w for h, w in grids)
    return tr.VisualTokens.from_items(feats, list(grids), torch.arange(start, start + n))


def check_origins(vt: tr.VisualTokens, drops: bool):
    """Every original token maps to a current token (or -1 if the reducer drops); sizes match."""
    counts = torch.bincount(vt.source[vt.source >= 0], minlength=len(vt)).float()
    assert torch.equal(counts, vt.size)
    if not drops:
        assert (vt.source >= 0).all()
    # representatives are members of their own group
    for i in range(len(vt)):
        assert vt.position[i] - vt.position.min() >= 0
    assert torch.all(vt.position[1:] > vt.position[:-1]), "spatial / prompt order is kept"


@pytest.mark.parametrize("t, target", [(64, 32), (64, 16), (64, 7), (63, 20), (576, 64), (577, 288), (5, 1), (9, 9)])
def test_bipartite_merge_meets_budget_exactly(t, target):
    x = torch.randn(3, t, 16)
    merged, assign, size = bipartite_merge(x, target)[:3]
    assert merged.shape == (3, target, 16)
    assert assign.shape == (3, t) and int(assign.min()) == 0 and int(assign.max()) == target - 1
    assert torch.equal(size.sum(1), torch.full((3,), float(t)))
    for g in range(3):
        assert torch.equal(torch.bincount(assign[g], minlength=target).float(), size[g])


def test_one_iteration_group_means_are_exact():
    x = torch.randn(2, 10, 4)
    merged, assign = bipartite_merge(x, 7)[:2]  # 10 -> 7: one iteration, 3 sources merged
    for g in range(2):
        for j in range(7):
            torch.testing.assert_close(merged[g, j], x[g, assign[g] == j].mean(0))


def test_weighted_merge_is_the_mean_of_the_originals():
    x = torch.randn(1, 64, 4)
    merged, assign = bipartite_merge(x, 9, weighted=True)[:2]  # several iterations
    for j in range(9):
        torch.testing.assert_close(merged[0, j], x[0, assign[0] == j].mean(0), atol=1e-5, rtol=1e-5)


def test_unweighted_merge_follows_the_release_rule():
    """weighted=False averages current tokens with equal weight (the release); differs from weighted."""
    x = torch.randn(1, 64, 4)
    a = bipartite_merge(x, 9, weighted=False).features
    b = bipartite_merge(x, 9, weighted=True).features
    assert not torch.allclose(a, b)


def test_merge_pairs_the_most_similar_tokens():
    # token pairs (0,1), (2,3), ... are near-duplicates; merging 8 -> 4 must merge exactly those pairs
    base = torch.randn(4, 32)
    x = base.repeat_interleave(2, 0) + 1e-3 * torch.randn(8, 32)
    assign = bipartite_merge(x[None], 4).assign
    assert assign[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_merge_is_deterministic_and_order_invariant_in_batch():
    x = torch.randn(4, 50, 8)
    a = bipartite_merge(x, 12)
    b = bipartite_merge(x.flip(0), 12)
    assert torch.equal(a[1], b[1].flip(0))
    torch.testing.assert_close(a[0], b[0].flip(0))


@pytest.mark.parametrize("weighted", [False, True])
def test_aim_merge_reducer_per_item_budgets_and_origins(weighted):
    vt = tokens([(8, 8), (4, 4), (8, 8)])
    out = AIMMerge(tokens=24, weighted=weighted).reduce([vt], [tr.Context()])[0]
    assert len(out) == 24
    assert out.item_counts().tolist() == tr.split_budget(24, [64, 16, 64]) == [11, 3, 10]
    check_origins(out, drops=False)
    # merged tokens never mix items: every member has the same item as its representative
    orig_item = vt.item
    for i in range(len(out)):
        assert (orig_item[out.members(i)] == out.item[i]).all()
    if weighted:
        for i in range(len(out)):
            torch.testing.assert_close(out.features[i], vt.features[out.members(i)].mean(0), atol=1e-5, rtol=1e-5)


def test_aim_merge_batches_samples_without_mixing_them():
    a, b = tokens([(8, 8)], seed=1), tokens([(8, 8)], seed=2)
    both = AIMMerge(keep=0.25).reduce([a, b], [tr.Context(), tr.Context(sample=1)])
    alone = [AIMMerge(keep=0.25).reduce([v], [tr.Context()])[0] for v in (a, b)]
    for x, y in zip(both, alone):
        assert torch.equal(x.source, y.source)
        torch.testing.assert_close(x.features, y.features)


def test_random_is_seeded_and_sample_local():
    vt = tokens([(8, 8), (8, 8)])
    r = RandomDrop(keep=0.25, seed=7)
    a = r.reduce_sample(vt, tr.Context())
    b = r.reduce_sample(vt, tr.Context(sample=5, batch_size=9))
    c = RandomDrop(keep=0.25, seed=8).reduce_sample(vt, tr.Context())
    assert torch.equal(a.source, b.source)
    assert not torch.equal(a.source, c.source)
    assert a.item_counts().tolist() == [16, 16]
    check_origins(a, drops=True)
    kept = torch.nonzero(a.source >= 0).flatten()
    assert torch.equal(a.features, vt.features[kept])


@pytest.mark.parametrize("h, w", [(8, 8), (5, 7), (24, 24), (1, 9), (3, 1)])
def test_pool_assignment_makes_exactly_k_contiguous_bins(h, w):
    for k in range(1, h * w + 1):
        ids = pool_assignment(h, w, k).view(h, w)
        assert torch.equal(torch.unique(ids), torch.arange(k))
        for b in range(k):
            rows, cols = torch.nonzero(ids == b, as_tuple=True)
            # a rectangle: its cell count equals its bounding box
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert int(box) == rows.numel()


def test_pool_quarter_is_2x2_average_pooling():
    vt = tokens([(8, 8)])
    out = Pool(keep=0.25).reduce_sample(vt, tr.Context())
    ref = torch.nn.functional.avg_pool2d(vt.features.T.reshape(1, -1, 8, 8), 2).reshape(-1, 16).T
    torch.testing.assert_close(out.features, ref)
    assert torch.equal(out.size, torch.full((16,), 4.0))
    check_origins(out, drops=False)


def test_pool_needs_a_full_rectangle():
    vt = RandomDrop(keep=0.5).reduce_sample(tokens([(8, 8)]), tr.Context())
    with pytest.raises(tr.BudgetError, match="not a full rectangle of its 8x8 grid"):
        Pool(keep=0.5).reduce_sample(vt, tr.Context())


def test_pool_on_an_unpadded_crop_pools_the_rectangle_left():
    """Anyres unpadding leaves a rectangle of a crop's grid: pool it like a smaller grid."""
    vt = tokens([(8, 8)])
    rect = torch.nonzero((vt.row >= 2) & (vt.row < 6)).flatten()  # rows 2..5: a 4x8 rectangle
    out = Pool(tokens=8).reduce_sample(vt.select(rect), tr.Context())
    ref = torch.nn.functional.avg_pool2d(vt.features[rect].T.reshape(1, -1, 4, 8), 2).reshape(-1, 8).T
    torch.testing.assert_close(out.features, ref)
    assert sorted(out.row.tolist()) == [2, 2, 2, 2, 4, 4, 4, 4]


def test_visual_tokens_group_and_select_compose_origins():
    vt = tokens([(2, 4)])
    g = vt.group(torch.tensor([1, 1, 0, 0, -1, 2, 2, 2]), 3)  # group ids out of order on purpose
    assert g.size.tolist() == [2.0, 2.0, 3.0]  # reordered by first member
    assert g.source.tolist() == [0, 0, 1, 1, -1, 2, 2, 2]
    assert g.row.tolist() == [0, 0, 1] and g.col.tolist() == [0, 2, 1]
    s = g.select(torch.tensor([0, 2]))
    assert s.source.tolist() == [0, 0, -1, -1, -1, 1, 1, 1]
    assert s.members(1).tolist() == [5, 6, 7]
    with pytest.raises(ValueError, match="at least one member"):
        vt.group(torch.zeros(8, dtype=torch.long), 2)


def test_group_with_representatives_keeps_id_order_and_takes_their_origin():
    vt = tokens([(2, 4)])
    g = vt.group(torch.tensor([1, 1, 0, 0, -1, 2, 2, 2]), 3, rep=torch.tensor([3, 0, 7]))
    assert g.size.tolist() == [2.0, 2.0, 3.0]  # ids kept in order: group 0 is tokens 2 and 3
    assert g.source.tolist() == [1, 1, 0, 0, -1, 2, 2, 2]
    assert g.position.tolist() == [vt.position[3], vt.position[0], vt.position[7]]
    assert g.row.tolist() == [0, 0, 1] and g.col.tolist() == [3, 0, 3]
    torch.testing.assert_close(g.features[0], vt.features[2:4].mean(0))
