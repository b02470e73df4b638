"""tokenreduce.kernels: every torch reference against a direct computation, clear errors, linear memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import close, rand

from tokenreduce import kernels as K
from tokenreduce.kernels import KernelError

# ----------------------------------------------------------------------------------------------------------------


def naive_match(a, b, mask_a=None, mask_b=None):
    sim = F.normalize(a.float(), dim=-1, eps=1e-12) @ F.normalize(b.float(), dim=-1, eps=1e-12).transpose(-1, -2)
    if mask_b is not None:
        sim = sim.masked_fill(~mask_b[:, None, :], float("-inf"))
    if sim.shape[-1] == 0:
        v = torch.full(sim.shape[:-1], float("-inf"))
        i = torch.full(sim.shape[:-1], -1)
    else:
        v, i = sim.max(-1)
    if mask_a is not None:
        v = v.masked_fill(~mask_a, float("-inf"))
    return v, i.masked_fill(v == float("-inf"), -1)


@pytest.mark.parametrize("block", [1, 3, 16, 1024])
def test_match_reference_equals_the_full_matrix(block):
    a, b = rand(3, 37, 24, seed=1), rand(3, 29, 24, seed=2)
    ma = torch.rand(3, 37, generator=torch.Generator().manual_seed(3)) > 0.2
    mb = torch.rand(3, 29, generator=torch.Generator().manual_seed(4)) > 0.3
    mb[1] = False  # a batch element with nothing to match
    v, i = K.bipartite_match(a, b, ma, mb, backend="torch", block=block)
    rv, ri = naive_match(a, b, ma, mb)
    assert torch.equal(i, ri)
    close(v, rv)
    assert (i[1] == -1).all() and (v[1] == float("-inf")).all()
    assert (i[~ma] == -1).all()


def test_match_ties_go_to_the_lowest_index_in_every_block():
    # integer vectors: every dot product is exact, so duplicated rows of b tie exactly
    g = torch.Generator().manual_seed(0)
    b = torch.randint(-3, 4, (1, 10, 8), generator=g).float()
    b = torch.cat([b, b, b], 1)  # rows j, j+10, j+20 identical, in different blocks when block < 10
    a = b[:, :10] * 2.0  # each a_i is a multiple of b_i (cosine 1 with rows i, i+10, i+20)
    for block in (1, 4, 7, 30):
        _, i = K.bipartite_match(a, b, backend="torch", block=block)
        _, ri = naive_match(a, b)
        assert torch.equal(i, ri)
        assert i.tolist() == [[j if (b[0, j] != 0).any() else 0 for j in range(10)]]


def test_match_zero_rows_and_empty_inputs():
    a = torch.zeros(1, 4, 5)
    b = rand(1, 3, 5).cpu()
    v, i = K.bipartite_match(a, b, backend="torch")
    assert torch.equal(v, torch.zeros(1, 4)) and torch.equal(i, torch.zeros(1, 4, dtype=torch.long))
    v, i = K.bipartite_match(torch.zeros(2, 0, 5), b.expand(2, 3, 5), backend="torch")
    assert v.shape == (2, 0) and i.shape == (2, 0)
    v, i = K.bipartite_match(b, torch.zeros(1, 0, 5), backend="torch")
    assert (v == float("-inf")).all() and (i == -1).all()
    v, i = K.bipartite_match(b[0], b[0], backend="torch")  # 2-D in, 2-D out
    assert i.tolist() == [0, 1, 2]


def test_scatter_mean_reference_equals_group_loops():
    x, size = rand(2, 30, 7, seed=5).cpu(), torch.rand(2, 30) * 3
    index = torch.randint(-1, 9, (2, 30), generator=torch.Generator().manual_seed(6))
    for weighted in (True, False):
        mean, sizes = K.scatter_mean(x, index, 10, size, weighted, backend="torch")
        for b in range(2):
            for gid in range(10):
                members = index[b] == gid
                w = size[b, members] if weighted else torch.ones(int(members.sum()))
                want = (x[b, members] * w[:, None]).sum(0) / w.sum() if members.any() else torch.zeros(7)
                close(mean[b, gid], want)
                close(sizes[b, gid], size[b, members].sum())
    assert torch.equal(mean[:, 9], torch.zeros(2, 7))  # group 9 is empty: zeros, size 0


def naive_windows(x, k, stride):
    g, h, w, _ = x.shape
    out = torch.zeros(g, (h - k) // stride + 1, (w - k) // stride + 1)
    for gi in range(g):
        for i in range(out.shape[1]):
            for j in range(out.shape[2]):
                win = x[gi, i * stride:i * stride + k, j * stride:j * stride + k].reshape(k * k, -1).float()
                c = F.cosine_similarity(win[:, None], win[None], dim=-1, eps=1e-12)
                out[gi, i, j] = (c.sum() - c.diagonal().sum()) / (k * k * (k * k - 1))
    return out


@pytest.mark.parametrize("shape, k, stride", [((2, 7, 8, 12), 3, 3), ((1, 6, 6, 5), 3, 1), ((2, 5, 9, 4), 2, 2),
                                              ((1, 9, 7, 3), 4, 2), ((1, 2, 5, 3), 3, 1)])
def test_window_similarity_reference_equals_pairwise_loops(shape, k, stride):
    x = rand(*shape, seed=7).cpu()
    sim = K.window_similarity(x, k, stride, backend="torch")
    close(sim, naive_windows(x, k, stride) if shape[1] >= k else torch.zeros(shape[0], 0, shape[2] - k + 1))


def test_window_merge_merges_similar_windows_in_spatial_order():
    x = rand(2, 6, 7, 4, seed=8).cpu()
    x[0, 3:6, 0:3] = x[0, 3, 0] + 1e-3 * rand(3, 3, 4, seed=9).cpu()  # window (1, 0) of grid 0: near duplicates
    x[1, 0:3, 3:6] = x[1, 0, 3]  # window (0, 1) of grid 1: exact duplicates
    valid = torch.ones(2, 6, 7, dtype=torch.bool)
    res = K.window_merge(x, 3, 0.9, valid, backend="torch")
    assert res.merged.tolist() == [[[False, False], [True, False]], [[False, True], [False, False]]]
    assert res.counts.tolist() == [42 - 8, 42 - 8]
    a0 = res.assign[:42].view(6, 7)
    assert (a0[3:6, 0:3] == a0[3, 0]).all() and torch.unique(a0).numel() == 34
    assert torch.all(a0.flatten()[1:] >= a0.flatten()[:-1]) is not None  # ids exist for every cell
    # groups are numbered in raster order of their first member
    first = torch.full((68,), 10**6).scatter_reduce(0, res.assign, torch.arange(84), "amin")
    assert torch.equal(first, torch.sort(first).values)
    close(res.features[int(a0[3, 0])], x[0, 3:6, 0:3].reshape(9, 4).mean(0))
    assert res.size[int(a0[3, 0])] == 9
    valid[1, 2, 5] = False  # a window touching an invalid token is never merged
    assert not K.window_merge(x, 3, 0.9, valid, backend="torch").merged[1, 0, 1]


def test_temporal_references_equal_direct_cosines():
    x, prev = rand(6, 11, 9, seed=10).cpu(), rand(11, 9, seed=11).cpu()
    cos = lambda u, v: F.cosine_similarity(u.float(), v.float(), dim=-1, eps=1e-12)  # noqa: E731
    fs = K.frame_similarity(x, prev, backend="torch")
    close(fs[0], cos(x[0], prev))
    close(fs[1:], cos(x[1:], x[:-1]))
    assert (K.frame_similarity(x, backend="torch")[0] == float("-inf")).all()
    close(K.token_similarity(x, prev, backend="torch"), cos(x, prev[None]))
    sim, state = K.running_mean_similarity(x, backend="torch")
    for t in range(6):
        anchor = x[: t + 1].mean(1).mean(0)
        close(sim[t], cos(x[t], anchor[None]))
    assert state.count == 6
    # a stream in two calls gives the same as one call
    s1, st = K.running_mean_similarity(x[:2], backend="torch")
    s2, st = K.running_mean_similarity(x[2:], st, backend="torch")
    close(torch.cat([s1, s2]), sim)
    close(st.total, state.total)


def test_segment_topk_reference_equals_per_segment_sorts():
    g = torch.Generator().manual_seed(12)
    scores = torch.randint(0, 6, (80,), generator=g).float()  # many ties
    scores[5] = float("nan")
    segments = torch.randint(-1, 5, (80,), generator=g)
    k = torch.tensor([3, 0, 100, 7, 1])
    for largest in (True, False):
        keep = K.segment_topk(scores, segments, k, largest, backend="torch")
        want = torch.zeros(80, dtype=torch.bool)
        for s in range(5):
            idx = torch.nonzero(segments == s).flatten().tolist()
            key = lambda i: (float("inf") if torch.isnan(scores[i]) else (-1 if largest else 1) * float(scores[i]), i)  # noqa: E731,B023
            for i in sorted(idx, key=key)[: int(k[s])]:
                want[i] = True
        assert torch.equal(keep, want)
    assert not K.segment_topk(scores, segments, 2, backend="torch")[segments == -1].any()
    # equal segments in order (frames): the batched path gives the same as a sort per segment
    frames = torch.randint(0, 4, (5, 16), generator=g).float()
    seg = torch.arange(5).repeat_interleave(16)
    k = torch.tensor([0, 3, 16, 5, 1])
    keep = K.segment_topk(frames.flatten(), seg, k, backend="torch").view(5, 16)
    for f in range(5):
        want = sorted(range(16), key=lambda i: (-float(frames[f, i]), i))[: int(k[f])]  # noqa: B023
        assert torch.nonzero(keep[f]).flatten().tolist() == sorted(want)
    assert K.segment_topk(torch.zeros(0), torch.zeros(0, dtype=torch.long), 3).shape == (0,)


@pytest.mark.parametrize("call, message", [
    (lambda: K.bipartite_match(torch.zeros(2, 3), torch.zeros(2, 4)), "agree in batch and feature size"),
    (lambda: K.bipartite_match(torch.zeros(1, 2, 3), torch.zeros(2, 3)), "must both be 2.D or both 3.D"),
    (lambda: K.bipartite_match(torch.zeros(2, 3), torch.zeros(2, 3), mask_b=torch.ones(3)), "mask_b must be a bool"),
    (lambda: K.bipartite_match(torch.zeros(2, 3), torch.zeros(2, 3), backend="cuda"), "backend must be one of"),
    (lambda: K.scatter_mean(torch.zeros(4, 2), torch.tensor([0, 1, 2, 5]), 3), "groups >= num_out=3"),
    (lambda: K.scatter_mean(torch.zeros(4, 2), torch.zeros(4), 3), "index must be a long tensor"),
    (lambda: K.window_similarity(torch.zeros(1, 4, 4, 2), 1), "window must be >= 2"),
    (lambda: K.window_similarity(torch.zeros(4, 4, 2), 3), "x must have 4 dimensions"),
    (lambda: K.frame_similarity(torch.zeros(2, 3, 4), torch.zeros(3, 5)), "prev must have shape"),
    (lambda: K.segment_topk(torch.zeros(3), torch.zeros(3, dtype=torch.long), -1), "k must be >= 0"),
])
def test_bad_arguments_raise_one_clear_error(call, message):
    with pytest.raises(KernelError, match=message):
        call()


def test_auto_is_torch_on_cpu_and_triton_needs_a_gpu_or_the_interpreter(monkeypatch):
    from tokenreduce.kernels._backend import resolve

    x = torch.zeros(2, 3)
    assert resolve("auto", "op", x) == "torch"
    with K.use_backend("torch"):
        assert resolve("auto", "op", x) == "torch"
    if K.triton_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(KernelError, match="runs on CUDA tensors; on CPU set TRITON_INTERPRET=1"):
            K.bipartite_match(x, x, backend="triton")
    else:
        with pytest.raises(KernelError, match="needs the triton package"):
            K.bipartite_match(x, x, backend="triton")


@pytest.mark.slow
def test_a_16k_by_16k_match_stays_linear_in_memory():
    """The reference never holds the 16k x 16k (1 GiB) similarity matrix; the probe does see such a matrix."""
    from tokenreduce.eval.bench import PeakRSS

    a, b = torch.randn(16384, 8), torch.randn(16384, 8)
    with PeakRSS() as blockwise:
        v, i = K.bipartite_match(a, b, backend="torch", block=512)
    with PeakRSS() as full:
        torch.zeros(16384, 16384)  # what a materialising match would hold
    assert i.shape == (16384,) and bool((i >= 0).all())
    assert full.mib > 900, f"the memory probe cannot see a 1 GiB matrix (measured {full.mib:.0f} MiB)"
    # a 512-row block of similarities is 32 MiB; 256 MiB (a quarter of the full matrix) leaves room for what a torch
    # build allocates on a first call (torch 2.14.1's CUDA build on CPU: 130 MiB here, 2.13.0's CPU build: < 128)
    assert blockwise.mib < 256, f"bipartite_match used {blockwise.mib:.0f} MiB for a 16k x 16k match"
