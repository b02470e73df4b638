"""Oracles (DESIGN.md section 5) for the Qwen2-VL and Qwen2.5-VL adapters: images (different sizes, left-padded
batches) and videos, every VISUAL and PREFILL/DECODE reducer of the registry, sdpa and eager.

- keep-all plans are bit-identical to the stock model (logits and greedy tokens);
- pre-LLM pruning equals the stock model with the dropped slots masked out of attention and every kept token at
  its stock 3-D M-RoPE position; merging equals the stock LLM on the kept tokens' features at those positions;
- a batch equals each sample alone, and sdpa equals eager;
- in-LLM pruning runs, and its report matches the real KV cache lengths;
- reducers that need a CLS token, or that change tokens inside the tower, get a clear error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matrix import case, names
from PIL import Image
from tokenreduce.adapters.qwen2vl.zoo import build_qwen, qwen_inputs

import tokenreduce as tr
from tokenreduce.plan import Stage

PRESETS = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]
TURN = "<|im_start|>user\n{media}{text}<|im_end|>\n<|im_start|>assistant\n"
TEXTS = ["What is in the picture?", "Which colour is at the top left, please?"]


@pytest.fixture(scope="module")
def zoo():
    return {(p, a): build_qwen(p, seed=0, attn=a, llm_layers=4) for p in PRESETS for a in ("sdpa", "eager")}


def image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.NEAREST)


def clip(seed: int, frames: int = 4, size: tuple[int, int] = (84, 112)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (frames, 3, 4, 3), dtype=np.uint8)
    return np.repeat(np.repeat(small, size[0] // 3, axis=1), size[1] // 4, axis=2)


def images_in(model, tok, n: int = 2):
    """`n` prompts with one image each, of different sizes (so the batch is left-padded)."""
    sizes = [(168, 112), (112, 140)]
    texts = [TURN.format(media="<image>", text=t) for t in TEXTS[:n]]
    return qwen_inputs(model, tok, texts, images=[[image(i, sizes[i])] for i in range(n)])


def videos_in(model, tok, n: int = 2):
    texts = [TURN.format(media="<video>", text=t) for t in TEXTS[:n]]
    return qwen_inputs(model, tok, texts, videos=[[clip(i)] for i in range(n)])


def sample(x: dict, b: int) -> dict:
    """Sample b of a batch, alone (its padding removed), with its own pixel rows."""
    keep = x["attention_mask"][b].bool()
    out = {k: x[k][b:b + 1, keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for pv, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if pv in x:
            sizes = x[grid].prod(-1).tolist()
            out[pv] = x[pv].split(sizes)[b]
            out[grid] = x[grid][b:b + 1]
    return out


def run(model, x, plan, n=4, **kw):
    with torch.no_grad(), tr.apply(model, plan, **kw) as h:
        logits = model(**x).logits
        tokens = model.generate(**x, max_new_tokens=n, do_sample=False)
    return logits, tokens, h.report.calls[0]


def stock_positions(model, x) -> torch.Tensor:
    """(3, B, L) the stock model's M-RoPE ids of the full prompt."""
    kw = {k: x[k] for k in ("image_grid_thw", "video_grid_thw") if k in x}
    pos, _ = model.model.get_rope_index(x["input_ids"], mm_token_type_ids=x["mm_token_type_ids"],
                                        attention_mask=x["attention_mask"], **kw)
    return pos


KEEP_ALL = ["none"] + [case(n).keep_all for n in names(Stage.VISUAL, Stage.PREFILL, Stage.DECODE, cls=False)
                       if case(n).keep_all is not None]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("attn", ["sdpa", pytest.param("eager", marks=pytest.mark.slow)])
@pytest.mark.parametrize("media", ["image", "video"])
def test_keep_all_is_bit_identical(zoo, preset, attn, media):
    model, tok = zoo[preset, attn]
    x = images_in(model, tok) if media == "image" else videos_in(model, tok)
    with torch.no_grad():
        ref, ref_tokens = model(**x).logits, model.generate(**x, max_new_tokens=4, do_sample=False)
    for plan in KEEP_ALL:
        out, tokens, call = run(model, x, plan)
        assert torch.equal(out, ref), plan
        assert torch.equal(tokens, ref_tokens), plan
        assert call.seq_llm == call.seq_in


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("media", ["image", "video"])
def test_pruning_is_the_stock_model_with_dropped_slots_masked(zoo, preset, media):
    """random() drops whole tokens: the reduced model equals the stock one with those slots masked out and every
    token at its stock 3-D position (logits at every kept slot, greedy tokens), for a left-padded batch."""
    model, tok = zoo[preset, "sdpa"]
    x = images_in(model, tok) if media == "image" else videos_in(model, tok)
    out, gen, call = run(model, x, "random(keep=0.3, seed=2)")
    assert call.seq_llm[0] < call.seq_in[0]
    mask = torch.zeros_like(x["attention_mask"])
    for b in range(mask.shape[0]):
        mask[b, call.positions[b][call.positions[b] >= 0]] = 1
    ref_in = {**x, "attention_mask": mask, "position_ids": stock_positions(model, x)}
    with torch.no_grad():
        ref = model(**ref_in).logits
        ref_gen = model.generate(**ref_in, max_new_tokens=4, do_sample=False)
    for b in range(mask.shape[0]):
        kept = call.positions[b] >= 0
        torch.testing.assert_close(out[b, kept], ref[b, call.positions[b][kept]], atol=1e-4, rtol=1e-4)
    assert torch.equal(gen[:, x["input_ids"].shape[1]:], ref_gen[:, x["input_ids"].shape[1]:])


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", names(Stage.VISUAL, cls=False, fast=("aim-merge",)))
def test_every_visual_reducer_is_the_llm_on_its_tokens_at_stock_positions(zoo, preset, name):
    """Reduced logits == the stock LLM on inputs_embeds holding exactly the kept tokens (merged features
    included), each at the stock M-RoPE position of its slot."""
    model, tok = zoo[preset, "sdpa"]
    x = videos_in(model, tok, n=1)
    out, _, call = run(model, x, case(name).plan(0.25), tokenizer=tok)
    if case(name).exact:
        assert call.tokens() == [round(0.25 * call.tokens("input")[0])]
    kept = call.positions[0]
    ids = x["input_ids"][0, kept]
    embeds = model.get_input_embeddings()(ids).clone()
    vis = ids == model.config.video_token_id
    v = call.visual[0]
    embeds[vis] = v.features[torch.argsort(v.position)].to(embeds.dtype)
    pos = stock_positions(model, x)[:, :, kept]
    with torch.no_grad():
        ref = model(inputs_embeds=embeds[None], position_ids=pos).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", names(Stage.VISUAL, cls=False, fast=("pool",)))
def test_batch_equals_each_sample_alone(zoo, preset, name):
    model, tok = zoo[preset, "sdpa"]
    xb = images_in(model, tok)
    plan = case(name).plan(0.5)
    out_b, gen_b, call_b = run(model, xb, plan, tokenizer=tok)
    width = xb["input_ids"].shape[1]
    for b in range(2):
        x1 = sample(xb, b)
        out_1, gen_1, call_1 = run(model, x1, plan, tokenizer=tok)
        assert call_b.tokens()[b] == call_1.tokens()[0]
        n = call_1.seq_llm[0]
        torch.testing.assert_close(out_b[b, -n:], out_1[0], atol=1e-4, rtol=1e-4)
        new_1 = gen_1[0, x1["input_ids"].shape[1]:]
        assert torch.equal(gen_b[b, width:width + new_1.numel()], new_1)


@pytest.mark.parametrize("preset", PRESETS)
def test_sdpa_equals_eager(zoo, preset):
    calls, outs = [], []
    for attn in ("sdpa", "eager"):
        model, tok = zoo[preset, attn]
        out, _, call = run(model, videos_in(model, tok), "aim-merge(keep=0.25)")
        calls.append(call)
        outs.append(out)
    assert torch.equal(calls[0].visual[0].source, calls[1].visual[0].source)
    assert torch.equal(calls[0].positions, calls[1].positions)
    real = calls[0].positions >= 0  # padding rows attend to nothing real: their logits are noise in both
    torch.testing.assert_close(outs[0][real], outs[1][real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", names(Stage.PREFILL, Stage.DECODE, cls=False, fast=("aim-prune",)))
def test_in_llm_pruning_runs_and_reports_the_real_cache(zoo, preset, name):
    """PREFILL/DECODE reducers on a left-padded batch: the report's KV lengths are the cache's, generate
    runs, and every sample equals itself alone (last logits, greedy tokens)."""
    model, tok = zoo[preset, "sdpa"]
    _sharpen(model)
    try:
        xb = images_in(model, tok)
        # MustDrop's thresholds for these tiny decoders (the matrix's are tuned on the LLaVA ones)
        plan = case(name).plan().replace("global_thr=0.035", "global_thr=0.05")
        with torch.no_grad(), tr.apply(model, plan) as h:
            out = model(**xb, use_cache=True)
        call = h.report.last
        for i, layer in enumerate(out.past_key_values.layers):
            assert layer.keys.shape[2] == max(call.kv_tokens[i])
        assert call.llm_visual[-1] < call.llm_visual[0] or call.kv_tokens[-1] < call.kv_tokens[0]
        _, gen_b, call_b = run(model, xb, plan)
        width = xb["input_ids"].shape[1]
        for b in range(2):
            x1 = sample(xb, b)
            out_1, gen_1, call_1 = run(model, x1, plan)
            assert [layer[b] for layer in call_b.llm_visual] == [layer[0] for layer in call_1.llm_visual]
            torch.testing.assert_close(out.logits[b, -1], out_1[0, -1], atol=1e-4, rtol=1e-4)
            new_1 = gen_1[0, x1["input_ids"].shape[1]:]
            assert torch.equal(gen_b[b, width:width + new_1.numel()], new_1)
    finally:
        _sharpen(model, undo=True)


def _sharpen(model, undo: bool = False):
    """Random tiny decoders attend almost uniformly; sharper queries make attention-based pruning bite."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(1 / 8 if undo else 8)


@pytest.mark.parametrize("name", names(Stage.ENCODER, Stage.VISUAL, Stage.PREFILL, cls=True))
def test_reducers_that_need_a_cls_token_are_refused(zoo, name):
    model, _ = zoo["tiny-qwen2-vl", "sdpa"]
    with pytest.raises(tr.UnsupportedModelError, match="CLS"):
        tr.attach(model, case(name).plan())


def test_changing_tokens_inside_the_tower_is_refused(zoo):
    model, tok = zoo["tiny-qwen2-vl", "sdpa"]
    x = images_in(model, tok)
    with tr.apply(model, "mustdrop-vision(threshold=-1.0, key_ratio=0)"), pytest.raises(tr.InputError, match="2x2"):
        model(**x)


def test_text_only_generate_passes_through(zoo):
    model, tok = zoo["tiny-qwen2-vl", "sdpa"]
    x = tok(["<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**x, max_new_tokens=4, do_sample=False)
    with torch.no_grad(), tr.apply(model, "aim-merge(keep=0.25)+aim-prune(start=1, step=0.25)") as h:
        assert torch.equal(model.generate(**x, max_new_tokens=4, do_sample=False), ref)
    assert h.report.calls == []


def test_report_counts_and_flops(zoo):
    model, tok = zoo["tiny-qwen2.5-vl", "sdpa"]
    x = videos_in(model, tok)
    _, _, call = run(model, x, "pool(keep=0.25)")
    n = int((x["input_ids"][0] == model.config.video_token_id).sum())
    assert call.tokens("input") == [n, n]
    assert call.tokens() == [n // 4, n // 4]
    assert [it.kind for it in call.visual[0].items] == ["frame", "frame"]  # 4 frames = 2 temporal patches
    assert call.flops["llm_prefill"] < call.flops["llm_prefill_full"] and call.flops["vision"] > 0


def test_visual_tokens_count_without_running_the_model(zoo):
    model, tok = zoo["tiny-qwen2-vl", "sdpa"]
    x = images_in(model, tok)
    with tr.apply(model, "none") as h:
        counts = h.visual_tokens(**x)
    assert counts == [int((x["input_ids"][b] == model.config.image_token_id).sum()) for b in range(2)] == [24, 20]
    assert h.report.calls == []


def test_bench_runs_on_a_qwen_preset(tmp_path):
    """`tokenreduce bench --preset tiny-qwen2-vl`: the JSON has the unreduced row and the plan, with its tokens."""
    import json

    from tokenreduce.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny-qwen2-vl", "--image-size", "112", "--plans", "pool(keep=0.25)",
                 "--repeats", "1", "--warmup", "0", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["visual_tokens_per_image"] == 16
    assert [r["plan"] for r in data["results"]] == ["none", "pool(keep=0.25)"]
    assert data["results"][1]["visual_tokens"] == 4 and data["results"][1]["prefill_efficiency"] > 0
