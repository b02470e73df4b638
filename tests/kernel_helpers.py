"""Shared by the kernel tests: the device they run on, seeded inputs, the tolerances of issue 20."""

from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=0), torch.float16: dict(atol=1e-2, rtol=0)}


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def close(a, b, dtype=torch.float32):
    torch.testing.assert_close(a, b, **TOL[dtype])
