"""Issue 22 #4: a budget smaller than the number of frames, images or crops gives one clear `BudgetError`
naming the budget and the count (merging and pooling keep at least one token of each), never a raw ValueError
or "cannot make 0 bins"; reducers that drive them with per-frame budgets (QuoTA) may drop whole frames."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import tokenreduce as tr
from tokenreduce.cli import main
from tokenreduce.merge import AIMMerge
from tokenreduce.prune import Pool, QuoTA


def items(n: int, kind: str, side: int = 4) -> tr.VisualTokens:
    g = torch.Generator().manual_seed(n)
    info = [tr.tokens.ItemInfo(image=0 if kind == "frame" else i, kind=kind, index=i if kind == "frame" else -1)
            for i in range(n)]
    feats = [torch.randn(side * side, 8, generator=g) for _ in range(n)]
    return tr.VisualTokens.from_items(feats, [(side, side)] * n, torch.arange(n * side * side), info)


@pytest.mark.parametrize("reducer, what", [(AIMMerge(tokens=4), "8 frames"), (Pool(tokens=4), "8 frames")])
def test_fewer_tokens_than_frames_is_a_budget_error(reducer, what):
    with pytest.raises(tr.BudgetError, match=f"budget of 4 visual tokens is fewer than the {what}"):
        reducer.reduce([items(8, "frame")], [tr.Context()])


def test_fewer_tokens_than_images_names_images():
    with pytest.raises(tr.BudgetError, match="budget of 2 visual tokens is fewer than the 3 images or crops"):
        AIMMerge(tokens=2).reduce([items(3, "image")], [tr.Context()])
    with pytest.raises(tr.BudgetError, match="give tokens >= 3"):
        Pool(keep=0.02).reduce([items(3, "image")], [tr.Context()])  # round(0.02 x 48) = 1 token


def test_enough_for_one_token_each_works_and_frames_groups_lower_the_floor():
    out = AIMMerge(tokens=8).reduce([items(8, "frame")], [tr.Context()])[0]
    assert out.item_counts().tolist() == [1] * 8
    assert len(Pool(tokens=8).reduce([items(8, "frame")], [tr.Context()])[0]) == 8
    # merging across groups of 4 frames needs one token per group only
    out = AIMMerge(tokens=2, frames=4).reduce([items(8, "frame")], [tr.Context()])[0]
    assert len(out) == 2
    with pytest.raises(tr.BudgetError, match=r"fewer than the 2 frames \(in groups of frames=4\)"):
        AIMMerge(tokens=1, frames=4).reduce([items(8, "frame")], [tr.Context()])


@pytest.mark.parametrize("resize", ["pool", "aim-merge"])
def test_quota_with_fewer_tokens_than_frames_keeps_the_most_relevant_frames(resize):
    """QuoTA splits a budget smaller than the frame count over the most relevant frames (as the release drops
    frames whose share is 0); its inner reducer drops the other frames instead of failing."""
    scores = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.05, 0.3, 0.7, 0.6])
    out = QuoTA(tokens=3, scorer=lambda px, q, ctx: scores, resize=resize).reduce_sample(
        items(8, "frame"), tr.Context(pixels=torch.zeros(8, 3, 4, 4)))
    assert out.item_counts().tolist() == [0, 1, 0, 1, 0, 0, 1, 0]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from tokenreduce.video import write_video

    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path, np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8), fps=8)
    return path


@pytest.mark.parametrize("plan", ["aim-merge(tokens=4)", "pool(tokens=4)"])
def test_cli_says_so_in_one_line(clip, capsys, plan):
    """The issue's command: `tokenreduce run --video clip.mp4 --plan "aim-merge(tokens=4)"` on 8 frames."""
    try:
        code = main(["run", "--video", str(clip), "--model", "tiny-onevision", "--frames", "8", "--plan", plan,
                     "--prompt", "What moves?", "--max-new-tokens", "1"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    out, err = capsys.readouterr()
    assert code == 2, out + err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and "traceback" not in err.lower()
    assert "budget of 4 visual tokens is fewer than the 8 frames" in lines[0]
