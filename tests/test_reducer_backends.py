"""The reducers give the same kept and merged sets on both kernel backends (Triton's interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_image, prompt
from kernel_helpers import DEVICE

import tokenreduce as tr
from tokenreduce import kernels
from tokenreduce.merge import AIMMerge
from tokenreduce.prune import Pool

pytestmark = [pytest.mark.triton, pytest.mark.skipif(not kernels.triton_available(),
                                                     reason="triton is not installed: pip install '.[triton]'")]


def grids(n: int, side: int, d: int = 12, seed: int = 0) -> tr.VisualTokens:
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(side * side, d, generator=g).to(DEVICE) for _ in range(n)]
    return tr.VisualTokens.from_items(feats, [(side, side)] * n, torch.arange(n * side * side) + 1)


def same(a: tr.VisualTokens, b: tr.VisualTokens) -> None:
    assert torch.equal(a.source, b.source) and torch.equal(a.position, b.position)
    torch.testing.assert_close(a.features, b.features, atol=1e-5, rtol=0)
    assert torch.equal(a.size, b.size)


@pytest.mark.parametrize("reducer", [AIMMerge(keep=0.25), AIMMerge(tokens=37, weighted=True),
                                     AIMMerge(keep=0.4, order="release"), Pool(keep=0.3)])
def test_visual_reducers_agree_across_backends(reducer):
    vt = grids(3, 7)
    out = {}
    for backend in ("torch", "triton"):
        with kernels.use_backend(backend):
            out[backend] = reducer.reduce([vt], [tr.Context()])[0]
    same(out["torch"], out["triton"])


@pytest.mark.parametrize("plan", ["mustdrop-vision(threshold=0.3)", "hired(keep=0.3)",
                                  "aim-merge(keep=0.3, metric='keys')"])
def test_model_plans_agree_across_backends(processor, plan):
    from tokenreduce.adapters.llava.zoo import build_llava

    model = build_llava("tiny", seed=0).to(DEVICE)
    x = processor(text=prompt("What is this?"), images=make_image(3), return_tensors="pt").to(DEVICE)
    calls = {}
    for backend in ("torch", "triton"):
        with torch.no_grad(), kernels.use_backend(backend), tr.apply(model, plan) as h:
            logits = model(**x).logits
        calls[backend] = (h.report.calls[0].visual[0], logits)
    same(calls["torch"][0], calls["triton"][0])
    torch.testing.assert_close(calls["torch"][1], calls["triton"][1], atol=1e-4, rtol=0)
