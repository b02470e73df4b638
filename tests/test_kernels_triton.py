"""Every Triton kernel against its torch reference: indices exactly, values to 1e-5 (fp32) / 1e-2 (fp16), on odd
shapes, masks, ties and empty inputs. On CPU they run in Triton's interpreter (TRITON_INTERPRET=1, set by
kernel_helpers before the first kernel is built), compiled on a GPU. Skipped only when triton is not installed."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DEVICE, close, rand

from tokenreduce import kernels as K

pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(not K.triton_available(), reason="triton is not installed: pip install '.[triton]'")]

# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bsz, na, nb, d", [(2, 37, 29, 50), (1, 5, 70, 16), (3, 1, 1, 3), (1, 65, 66, 130)])
@pytest.mark.parametrize("masks", [False, True])
def test_triton_match_equals_reference(bsz, na, nb, d, dtype, masks):
    a, b = rand(bsz, na, d, dtype=dtype, seed=1), rand(bsz, nb, d, dtype=dtype, seed=2)
    g = torch.Generator().manual_seed(3)
    ma = (torch.rand(bsz, na, generator=g) > 0.2).to(DEVICE) if masks else None
    mb = (torch.rand(bsz, nb, generator=g) > 0.3).to(DEVICE) if masks else None
    rv, ri = K.bipartite_match(a, b, ma, mb, backend="torch")
    v, i = K.bipartite_match(a, b, ma, mb, backend="triton")
    assert torch.equal(i, ri)
    close(v, rv, dtype)


def test_triton_match_ties_strided_views_and_empty():
    g = torch.Generator().manual_seed(0)
    b = torch.randint(-3, 4, (2, 40, 8), generator=g).float()
    b = torch.cat([b, b], 1).to(DEVICE)  # exact ties across tiles of 64 and within
    a = b[:, :40] * 3
    assert torch.equal(K.bipartite_match(a, b, backend="triton")[1], K.bipartite_match(a, b, backend="torch")[1])
    x = rand(2, 41, 20, seed=4)
    for v in (x[:, ::2], x[:, 1::2]):  # ToMe's alternating split, as views
        r = K.bipartite_match(v, x[:, 1::2], backend="torch")
        t = K.bipartite_match(v, x[:, 1::2], backend="triton")
        assert torch.equal(r[1], t[1])
        close(r[0], t[0])
    v, i = K.bipartite_match(x[:, :0], x, backend="triton")
    assert v.shape == (2, 0)
    v, i = K.bipartite_match(x, x[:, :0], backend="triton")
    assert (i == -1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bsz, n, d, m", [(2, 37, 50, 10), (1, 5, 3, 7), (1, 40, 300, 3)])
def test_triton_scatter_mean_equals_reference(bsz, n, d, m, dtype):
    x = rand(bsz, n, d, dtype=dtype, seed=5)
    g = torch.Generator().manual_seed(6)
    index = torch.randint(-1, m, (bsz, n), generator=g).to(DEVICE)
    size = (torch.rand(bsz, n, generator=g) * 3).to(DEVICE)
    for weighted in (True, False):
        rm, rs = K.scatter_mean(x, index, m, size, weighted, backend="torch")
        tm, ts = K.scatter_mean(x, index, m, size, weighted, backend="triton")
        close(tm.float(), rm.float(), dtype)
        close(ts, rs)
    empty = K.scatter_mean(x[:, :0], index[:, :0], m, backend="triton")
    assert torch.equal(empty[1], torch.zeros(bsz, m, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape, k, stride", [((2, 7, 8, 20), 3, 3), ((1, 6, 6, 70), 3, 1), ((2, 5, 9, 4), 2, 2),
                                              ((1, 9, 9, 8), 5, 2), ((1, 2, 2, 3), 3, 3)])
def test_triton_window_similarity_equals_reference(shape, k, stride, dtype):
    x = rand(*shape, dtype=dtype, seed=7)
    close(K.window_similarity(x, k, stride, backend="triton"), K.window_similarity(x, k, stride, backend="torch"),
          dtype)


def test_triton_window_merge_equals_reference():
    x = rand(2, 7, 6, 10, seed=8)
    x[0, 0:3, 0:3] = x[0, 0, 0]
    x[1, 3:6, 3:6] = x[1, 3, 3] + 1e-3
    valid = torch.ones(2, 7, 6, dtype=torch.bool, device=DEVICE)
    valid[0, 6, 5] = False
    r = K.window_merge(x, 3, 0.5, valid, backend="torch")
    t = K.window_merge(x, 3, 0.5, valid, backend="triton")
    assert torch.equal(r.assign, t.assign) and torch.equal(r.merged, t.merged) and r.merged.any()
    close(t.features, r.features)
    close(t.similarity, r.similarity)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t, n, d", [(5, 13, 40), (1, 70, 129), (3, 1, 2)])
def test_triton_temporal_equals_reference(t, n, d, dtype):
    x, prev = rand(t, n, d, dtype=dtype, seed=9), rand(n, d, dtype=dtype, seed=10)
    for fn in (lambda b: K.frame_similarity(x, prev, backend=b), lambda b: K.frame_similarity(x, backend=b),
               lambda b: K.token_similarity(x, prev, backend=b), lambda b: K.running_mean_similarity(x, backend=b)[0]):
        close(fn("triton"), fn("torch"), dtype)
    assert K.frame_similarity(x[:0], backend="triton").shape == (0, n)


@pytest.mark.parametrize("n, segs", [(80, 5), (300, 3), (7, 1), (1, 1)])
def test_triton_segment_topk_equals_reference(n, segs):
    g = torch.Generator().manual_seed(n)
    scores = torch.randint(0, 6, (n,), generator=g).float().to(DEVICE)  # ties
    scores[0] = float("nan")
    segments = torch.randint(-1, segs, (n,), generator=g).to(DEVICE)
    k = torch.randint(0, 50, (segs,), generator=g).to(DEVICE)
    for largest in (True, False):
        assert torch.equal(K.segment_topk(scores, segments, k, largest, backend="triton"),
                           K.segment_topk(scores, segments, k, largest, backend="torch"))
