"""The pipeline's contracts for reducers: vision-layer overrides (what STC's cacher builds on), the raw pre-pool
grids in the Context (QuoTA's resize), and one StageRunner for every stage's report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pytest
import torch
from conftest import make_image, prompt
from tokenreduce.adapters.llava.zoo import build_llava_with_processor
from tokenreduce.adapters.videollm import video_inputs
from tokenreduce.adapters.videollm.zoo import build_video_llm

import tokenreduce as tr
from tokenreduce.encoder import EncoderReducer
from tokenreduce.prune.quota import QuoTA
from tokenreduce.registry import adapter_for


@dataclass
class BranchByBranch(EncoderReducer):
    """Runs chosen vision layers itself from the layer's two branches, frame by frame for frames after the first
    (reusing nothing), and remembers what it saw. Not registered: used through tr.Plan([...])."""

    name: ClassVar[str] = "test-branch-by-branch"
    at: tuple[int, ...] = (0, 1)
    seen: list = field(default_factory=list)

    def overrides(self, tower):
        return list(self.at)

    def run_layer(self, layer, tower, hidden, state, contexts):
        parts = tower.branches(tower.layers[layer])
        state.scratch.setdefault(id(self), []).append(layer)  # per-call state, kept across layers
        self.seen.append((layer, [(b, j, it.kind, it.index) for b, j, it in state.items], list(state.scratch[id(self)]),
                          tuple(state.rows.shape)))
        out = torch.empty_like(hidden)
        for g in range(hidden.shape[0]):  # item by item, in order
            x = hidden[g:g + 1]
            mask = None if state.mask is None else state.mask[g:g + 1]
            x = x + parts.attn(x, mask)
            out[g:g + 1] = x + parts.mlp(x)
        return out


def test_layer_override_runs_the_layer_for_every_item_in_order():
    """An ENCODER reducer running two CLIP layers itself from their branches, one frame at a time, gives the
    stock model's logits (to rounding); it sees every frame in order, with per-call scratch kept across layers."""
    model, tok = build_video_llm("tiny-video-llava", seed=0)
    spec = adapter_for(model)(model).video_spec()
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 256, (3, 64, 80, 3), dtype=np.uint8) for _ in range(2)]
    x = video_inputs(tok, spec, ["USER: <video>\nWhat? ASSISTANT:", "USER: <video>\nColour? ASSISTANT:"], clips)
    with torch.no_grad():
        ref = model(**x).logits
    red = BranchByBranch()
    with torch.no_grad(), tr.apply(model, tr.Plan([red])) as h:
        out = model(**x).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert [layer for layer, *_ in red.seen] == [0, 1]
    items = red.seen[0][1]
    assert items == [(b, j, "frame", j) for b in range(2) for j in range(3)]
    assert red.seen[1][2] == [0, 1]  # the scratch of the call saw both layers
    assert h.report.last.times["reduce:test-branch-by-branch"] > 0


def test_two_reducers_may_not_override_one_layer():
    model, proc = build_llava_with_processor("tiny", seed=0)
    x = proc(text=prompt("What?"), images=make_image(1), return_tensors="pt")
    with tr.apply(model, tr.Plan([BranchByBranch(at=(0,)), BranchByBranch(at=(0,))])):
        with pytest.raises(tr.UnsupportedModelError, match="only one may"):
            model(**x)


def test_context_has_the_raw_grid_before_pooling():
    """LLaVA-OneVision pools every frame's projected 8x8 (27x27 at full size) grid to 4x4 (14x14): a VISUAL reducer
    finds the projected grid before pooling in ctx.raw_grids, equal to the model's own projection."""
    model, tok = build_video_llm("tiny-onevision", seed=0)
    spec = adapter_for(model)(model).video_spec()
    rng = np.random.default_rng(1)
    x = video_inputs(tok, spec, ["USER: <video>\nWhat? ASSISTANT:"], [rng.integers(0, 256, (4, 64, 64, 3),
                                                                               dtype=np.uint8)])
    seen = {}

    def scorer(pixels, question, ctx):
        seen["raw"] = ctx.raw_grids
        return torch.ones(pixels.shape[0])

    with torch.no_grad(), tr.apply(model, tr.Plan([QuoTA(tokens=32, scorer=scorer, resize="pool")])):
        model(**x)
    with torch.no_grad():
        pv = x["pixel_values_videos"].flatten(0, 1)
        feats = model.model.vision_tower(pv, output_hidden_states=True).hidden_states[-1]
        ref = model.model.multi_modal_projector(feats)
    assert seen["raw"].shape == (4, 8, 8, ref.shape[-1])
    torch.testing.assert_close(seen["raw"].flatten(1, 2), ref, atol=1e-5, rtol=1e-5)


def test_one_runner_reports_every_stage():
    """ENCODER, VISUAL, PREFILL and DECODE reducers are timed and counted by the same runner: every reducer of
    the plan has its time, and the stages list the ENCODER and VISUAL counts in plan order."""
    model, proc = build_llava_with_processor("tiny", seed=0, llm_layers=4)
    x = proc(text=prompt("What?"), images=make_image(1), return_tensors="pt")
    plan = ("mustdrop-vision(threshold=0.3)+random(keep=0.5)+random(keep=0.5)+"
            "mustdrop-prefill(layers=[1], global_thr=0, individual_thr=0)+mustdrop-decode")
    with torch.no_grad(), tr.apply(model, plan) as h:
        model.generate(**x, max_new_tokens=2, do_sample=False)
    call = h.report.last
    assert [s for s, _ in call.stages] == ["input", "mustdrop-vision", "random", "random#2"]
    for key in ("reduce:mustdrop-vision", "reduce:random", "reduce:random#2", "reduce:mustdrop-prefill",
                "reduce:mustdrop-decode", "vision", "prefill"):
        assert call.times[key] > 0, key
