"""In-LLM reduction through the VLM adapters: MustDrop (all stages), AIM (merge + prune), HiRED + MustDrop prefill.

The engine itself is tested against hand-written reference forwards in test_llm.py; here the oracles of
DESIGN.md section 5 are checked end to end on LLaVA-1.5, LLaVA-NeXT and a Qwen2-based LLaVA-OneVision.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_image, prompt
from matrix import case, names
from tokenreduce.adapters.llava.zoo import build_llava_with_processor
from tokenreduce.adapters.videollm import video_inputs
from tokenreduce.adapters.videollm.zoo import build_video_llm

import tokenreduce as tr
from tokenreduce.plan import Stage
from tokenreduce.registry import adapter_for

DROPPING = [
    "mustdrop(layers=[1, 2], global_thr=0.02, individual_thr=0.05, threshold=0.3)",
    "aim-merge(keep=0.5)+aim-prune(start=1, step=0.25)",
    "hired(keep=0.5)+mustdrop-prefill(layers=[1], global_thr=0.035, individual_thr=0.5)",
]


def _sharpen(model):
    """Random tiny decoders attend almost uniformly; sharper queries make MustDrop's thresholds bite."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
    return model


@pytest.fixture(scope="module")
def zoo():
    out = {}
    for p in ("tiny", "tiny-next"):
        for a in ("sdpa", "eager"):
            model, proc = build_llava_with_processor(p, seed=0, attn=a, llm_layers=4)
            out[p, a] = (_sharpen(model), proc)
    return out


def inputs(proc, n=1):
    texts = [prompt("What is in the picture?"), prompt("Colour of the top left corner, please?")][:n]
    images = [make_image(1, (200, 120)), make_image(2, (100, 160))][:n]
    return proc(text=texts, images=images, padding=True, return_tensors="pt")


def run(model, x, plan, n=4, **kw):
    kw = {"do_sample": False, **kw}
    with torch.no_grad(), tr.apply(model, plan) as h:
        logits = model(**x).logits
        tokens = model.generate(**x, max_new_tokens=n, **kw)
    return logits, tokens, h.report.calls[0]


@pytest.mark.parametrize("preset", ["tiny", "tiny-next"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("plan", ["mustdrop-prefill(layers=[1, 2], global_thr=0, individual_thr=0)+mustdrop-decode"])
def test_keep_all_in_llm_is_bit_identical(zoo, preset, attn, plan):
    model, proc = zoo[preset, attn]
    x = inputs(proc)
    with torch.no_grad():
        ref, ref_tokens = model(**x).logits, model.generate(**x, max_new_tokens=4, do_sample=False)
    out, tokens, call = run(model, x, plan)
    assert torch.equal(out, ref) and torch.equal(tokens, ref_tokens)
    assert len(set(map(tuple, call.llm_visual))) == 1  # every layer saw every visual token


@pytest.mark.parametrize("name", names(Stage.PREFILL, Stage.DECODE, fast=("aim-prune",)))
def test_every_in_llm_reducer_alone(zoo, name):
    """Every registered PREFILL/DECODE reducer on its own: a padded batch equals each sample alone, and sdpa
    gives eager's tokens per layer and cache sizes."""
    test_batch_equals_each_sample_alone(zoo, "tiny", case(name).plan())
    calls = [run(zoo["tiny", a][0], inputs(zoo["tiny", a][1]), case(name).plan())[2] for a in ("sdpa", "eager")]
    assert calls[0].llm_visual == calls[1].llm_visual and calls[0].kv_tokens == calls[1].kv_tokens


@pytest.mark.parametrize("preset", ["tiny", "tiny-next"])
@pytest.mark.parametrize("plan", DROPPING)
def test_batch_equals_each_sample_alone(zoo, preset, plan):
    model, proc = zoo[preset, "sdpa"]
    xb = inputs(proc, 2)
    out_b, gen_b, call_b = run(model, xb, plan)
    width = xb["input_ids"].shape[1]
    assert any(a < b for a, b in zip(call_b.llm_visual[-1], call_b.llm_visual[0]))  # dropped inside the LLM
    for b in range(2):
        x1 = proc(text=[[prompt("What is in the picture?"), prompt("Colour of the top left corner, please?")][b]],
                  images=[[make_image(1, (200, 120)), make_image(2, (100, 160))][b]], return_tensors="pt")
        out_1, gen_1, call_1 = run(model, x1, plan)
        assert [layer[b] for layer in call_b.llm_visual] == [layer[0] for layer in call_1.llm_visual]
        torch.testing.assert_close(out_b[b, -1], out_1[0, -1], atol=1e-4, rtol=1e-4)
        new_1 = gen_1[0, x1["input_ids"].shape[1]:]
        assert torch.equal(gen_b[b, width:width + new_1.numel()], new_1)


@pytest.mark.parametrize("plan", DROPPING)
def test_same_tokens_per_layer_under_sdpa_and_eager(zoo, plan):
    calls = [run(zoo["tiny", a][0], inputs(zoo["tiny", a][1]), plan)[2] for a in ("sdpa", "eager")]
    assert calls[0].llm_visual == calls[1].llm_visual
    assert calls[0].kv_tokens == calls[1].kv_tokens


def test_report_matches_the_real_cache_and_logits(zoo):
    """KV cache lengths per layer, forward's logits length and the position map follow the real tensors."""
    model, proc = zoo["tiny", "sdpa"]
    x = inputs(proc)
    plan = "mustdrop(layers=[1, 2], global_thr=0.05, individual_thr=0.5, threshold=0.3)"
    with torch.no_grad(), tr.apply(model, plan) as h:
        out = model(**x, use_cache=True)
    call = h.report.last
    cache = out.past_key_values
    for i, layer in enumerate(cache.layers):
        assert layer.keys.shape[2] == call.kv_tokens[i][0]
    assert call.kv_tokens[0][0] == call.seq_llm[0]  # layer 0 keeps all (mustdrop acts after layer 1)
    assert call.kv_tokens[1][0] < call.kv_tokens[0][0]
    # the decode cut makes layers 1..2 hold only the final survivors, like layer 3
    assert call.kv_tokens[1][0] == call.kv_tokens[2][0] == call.kv_tokens[3][0]
    assert out.logits.shape[1] == call.positions.shape[1]
    assert int(call.positions[0, -1]) == x["input_ids"].shape[1] - 1  # the last position is the caller's last
    assert call.visual_layer_average[0] == pytest.approx(sum(v[0] for v in call.llm_visual) / 4)


def test_mustdrop_key_set_survives_everything(zoo):
    """Thresholds that drop every token they may: only the vision stage's key set remains."""
    model, proc = zoo["tiny", "sdpa"]
    _, _, call = run(model, inputs(proc), "mustdrop(layers=[1], global_thr=1.0, individual_thr=1.0, threshold=1.01)")
    keys = int(call.visual[0].scores["key"].sum())
    assert keys == -(-8 * 64 // 100)
    assert call.llm_visual[-1] == [keys]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_has_no_nan(dtype):
    model, proc = build_llava_with_processor("tiny", seed=0, llm_layers=4, dtype=dtype)
    model = _sharpen(model)
    x = inputs(proc, 2)
    x["pixel_values"] = x["pixel_values"].to(dtype)
    for plan in DROPPING:
        logits, tokens, _ = run(model, x, plan)
        assert bool(torch.isfinite(logits).all())


def test_labels_are_refused_with_in_llm_reduction(zoo):
    model, proc = zoo["tiny", "sdpa"]
    x = inputs(proc)
    with tr.apply(model, DROPPING[1]), pytest.raises(tr.InputError, match="labels"):
        model(**x, labels=x["input_ids"])


def test_qwen2_video_model_with_in_llm_pruning():
    """LLaVA-OneVision (Qwen2 decoder): AIM's merge + prune on video, batch equal to each sample alone."""
    model, tok = build_video_llm("tiny-onevision", seed=0, llm_layers=4)
    spec = adapter_for(model)(model).video_spec()
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8) for _ in range(2)]
    texts = ["USER: <video>\nWhat happens? ASSISTANT:", "USER: <video>\nWhich colour appears first? ASSISTANT:"]
    plan = "aim-merge(keep=0.5)+aim-prune(start=1, step=0.25)"
    xb = video_inputs(tok, spec, texts, clips)
    out_b, gen_b, call_b = run(model, xb, plan)
    assert call_b.llm_visual[-1][0] < call_b.llm_visual[0][0]
    for b in range(2):
        x1 = video_inputs(tok, spec, texts[b:b + 1], clips[b:b + 1])
        out_1, gen_1, _ = run(model, x1, plan)
        torch.testing.assert_close(out_b[b, -1], out_1[0, -1], atol=1e-4, rtol=1e-4)
        new_1 = gen_1[0, x1["input_ids"].shape[1]:]
        assert torch.equal(gen_b[b, xb["input_ids"].shape[1]:][:new_1.numel()], new_1)


def test_sampling_generate_runs_and_is_seeded(zoo):
    model, proc = zoo["tiny", "sdpa"]
    x = inputs(proc)
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        outs.append(run(model, x, DROPPING[0], do_sample=True, top_k=20)[1])
    assert torch.equal(outs[0], outs[1])
