"""Shared fixtures: tiny LLaVA models built from config (no downloads) and generated images."""

from __future__ import annotations

import os

import torch

# Triton reads TRITON_INTERPRET when it is first imported, and loading the models below imports it (through
# transformers): without a GPU, the Triton kernel tests run in its CPU interpreter (tests/test_kernels_triton.py).
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np
import pytest
from PIL import Image
from tokenreduce.adapters.llava.zoo import build_llava, build_processor

torch.set_num_threads(2)


def make_image(seed: int, size: tuple[int, int] = (120, 100)) -> Image.Image:
    """A deterministic image with blocks of colour (so neighbouring tokens are similar, as in photos)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.NEAREST)
    noise = rng.integers(0, 20, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="session")
def processor():
    return build_processor(112, 14)  # 8x8 = 64 visual tokens per image


@pytest.fixture(scope="session", params=["sdpa", "eager"])
def attn(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def models() -> dict[str, torch.nn.Module]:
    """The same random weights under sdpa and eager."""
    return {a: build_llava("tiny", seed=0, attn=a) for a in ("sdpa", "eager")}


@pytest.fixture()
def model(models, attn):
    return models[attn]


def prompt(text: str, n_images: int = 1) -> str:
    return "USER: " + "<image>\n" * n_images + text + " ASSISTANT:"


@pytest.fixture(scope="session")
def single_inputs(processor):
    return processor(text=prompt("What colour is the top left corner?"), images=make_image(1), return_tensors="pt")


@pytest.fixture(scope="session")
def batch_parts(processor):
    """Three samples: different images, prompt lengths and image counts (1, 2, 1 images)."""
    texts = [prompt("What is this?"), prompt("Compare the two images in detail, please.", 2), prompt("Colour?")]
    images = [[make_image(2)], [make_image(3), make_image(4)], [make_image(5, (90, 140))]]
    return texts, images


def pytest_collection_modifyitems(config, items):
    """Tests marked `browser` drive Debian's chromium with Playwright (`.ci/run` installs both and runs
    `pytest -m browser`): they run only when the -m expression names them, so `pytest -q` or `-m "not slow"`
    on a machine without chromium never starts them."""
    if "browser" in (config.getoption("markexpr") or ""):
        return
    skipped = [it for it in items if it.get_closest_marker("browser")]
    if skipped:
        config.hook.pytest_deselected(items=skipped)
        items[:] = [it for it in items if not it.get_closest_marker("browser")]
