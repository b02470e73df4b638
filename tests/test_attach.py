"""Attaching a plan, edge cases (issue 22): text-only calls on every family, deep copies, threads, bad plans,
bounded reports, beam search with in-LLM pruning, very wide or tall anyres images, and the Context services."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from conftest import make_image, prompt
from tokenreduce.adapters.llava.processing import byte_tokenizer
from tokenreduce.adapters.llava.zoo import build_llava, build_llava_with_processor
from tokenreduce.adapters.qwen2vl.zoo import build_qwen
from tokenreduce.adapters.videollm.zoo import build_video_llm

import tokenreduce as tr

slow = pytest.mark.slow
FAMILIES = ["tiny", pytest.param("tiny-next", marks=slow), pytest.param("tiny-video-llava", marks=slow),
            pytest.param("tiny-onevision", marks=slow), pytest.param("tiny-next-video", marks=slow), "tiny-qwen2-vl",
            pytest.param("tiny-qwen2.5-vl", marks=slow)]
IN_LLM = "aim-merge(keep=0.5)+aim-prune(start=1, step=0.25)"


def family(name: str):
    if name in ("tiny", "tiny-next"):
        return build_llava(name, seed=0, llm_layers=4), byte_tokenizer()
    if name.startswith("tiny-qwen"):
        return build_qwen(name, seed=0, llm_layers=4)
    return build_video_llm(name, seed=0, llm_layers=4)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("plan", ["none", IN_LLM])
def test_text_only_generate_works_with_any_plan(name, plan):
    """No visual inputs: generate (whose steps carry empty visual inputs and position ids) and forward equal
    the stock model, under every plan, on every family; nothing is reported."""
    model, tok = family(name)
    x = tok(["USER: hello there ASSISTANT:", "USER: hi ASSISTANT:"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**x, max_new_tokens=4, do_sample=False)
        ref_logits = model(**x).logits
    with torch.no_grad(), tr.apply(model, plan) as h:
        assert torch.equal(model.generate(**x, max_new_tokens=4, do_sample=False), ref)
        assert torch.equal(model(**x).logits, ref_logits)
    assert h.report.calls == []


def _llava_inputs(proc, n=2):
    texts = [prompt("What is in the picture?"), prompt("Colour of the top left corner, please?")][:n]
    return proc(text=texts, images=[make_image(1, (200, 120)), make_image(2, (100, 160))][:n], padding=True,
                return_tensors="pt")


def test_deepcopy_of_an_attached_model_is_a_clean_model():
    """A deep copy taken while attached carries no plan: it answers like a never-attached model, before and
    after the original detaches, and it can take a plan of its own."""
    model, proc = build_llava_with_processor("tiny", seed=0, llm_layers=4)
    fresh = build_llava("tiny", seed=0, llm_layers=4)
    x = _llava_inputs(proc)
    with torch.no_grad():
        ref = fresh(**x).logits
    handle = tr.attach(model, IN_LLM)
    twin = copy.deepcopy(model)
    assert not any(k in twin.__dict__ for k in ("forward", "generate", "__deepcopy__"))
    for m in twin.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, type(m).__name__
    with torch.no_grad():
        assert torch.equal(twin(**x).logits, ref)
        assert model(**x).logits.shape != ref.shape  # the original is still reduced
    handle.detach()
    with torch.no_grad():
        assert torch.equal(twin(**x).logits, ref)
        assert torch.equal(model(**x).logits, ref)
    with torch.no_grad(), tr.apply(twin, "pool(keep=0.25)") as h:
        twin(**x)
    assert h.report.tokens() == [16, 16]


def test_two_threads_attaching_to_one_model_one_wins():
    """Many rounds of two threads attaching at the same moment: exactly one succeeds each time, the other gets
    a clear error."""
    model = build_llava("tiny", seed=0)
    def attach(barrier: threading.Barrier, results: list) -> None:
        barrier.wait()
        try:
            results.append(tr.attach(model, "pool(keep=0.5)"))
        except RuntimeError as e:
            results.append(e)

    for _ in range(40):
        barrier, results = threading.Barrier(2), []
        threads = [threading.Thread(target=attach, args=(barrier, results)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        handles = [r for r in results if isinstance(r, tr.Handle)]
        errors = [r for r in results if isinstance(r, RuntimeError)]
        assert len(handles) == 1 and len(errors) == 1
        assert "already patched" in str(errors[0])
        handles[0].detach()
    assert "forward" not in model.__dict__


@pytest.mark.parametrize("plan", [None, 3, object()])
def test_attach_without_a_plan_is_a_clear_error(plan):
    model = build_llava("tiny", seed=0)
    with pytest.raises(tr.PlanError, match="plan"):
        tr.attach(model, plan)
    assert "forward" not in model.__dict__


def test_report_history_and_features_are_bounded():
    """A long-lived handle keeps the last `history` calls, and token features only for the last
    `keep_features` of them; full features on request."""
    model, proc = build_llava_with_processor("tiny", seed=0)
    x = _llava_inputs(proc, 1)
    with torch.no_grad(), tr.apply(model, "pool(keep=0.25)", history=5, keep_features=2) as h:
        for _ in range(12):
            model(**x)
    calls = h.report.calls
    assert len(calls) == 5 and h.report.dropped == 7
    assert [c.visual[0].features.shape[-1] > 0 for c in calls] == [False, False, False, True, True]
    assert all(c.tokens() == [16] and len(c.visual[0]) == 16 for c in calls)  # counts and origins stay
    with torch.no_grad(), tr.apply(model, "pool(keep=0.25)", keep_features=True) as h:
        for _ in range(12):
            model(**x)
    assert len(h.report.calls) == 12 and all(c.visual[0].features.shape == (16, 64) for c in h.report.calls)
    with pytest.raises(tr.PlanError, match="history"):
        tr.attach(model, "none", history=0)
    with pytest.raises(tr.PlanError, match="keep_features"):
        tr.attach(model, "none", keep_features=-1)


@pytest.mark.parametrize("gen", [dict(num_beams=3), pytest.param(dict(num_beams=2, num_return_sequences=2), marks=slow),
                                 pytest.param(dict(do_sample=True, top_k=20, num_return_sequences=3), marks=slow)])
def test_in_llm_plans_with_beams_and_several_sequences(gen):
    """generate expands every sample into identical rows: an in-LLM plan that keeps everything is bit-identical
    to the stock model, and a pruning plan gives each sample what it gives that sample alone."""
    model, proc = build_llava_with_processor("tiny", seed=0, llm_layers=4)
    xb = _llava_inputs(proc)
    keep_all = "mustdrop-prefill(layers=[1, 2], global_thr=0, individual_thr=0)+mustdrop-decode"

    def generate(x, plan=None):
        torch.manual_seed(0)
        with torch.no_grad():
            if plan is None:
                return model.generate(**x, max_new_tokens=5, **gen), None
            with tr.apply(model, plan) as h:
                return model.generate(**x, max_new_tokens=5, **gen), h.report.last

    ref, _ = generate(xb)
    out, _ = generate(xb, keep_all)
    assert torch.equal(out, ref)
    out, call = generate(xb, IN_LLM)
    assert call.llm_visual[-1][0] < call.llm_visual[0][0] and len(call.kv_tokens[0]) == 2  # per sample
    rows = out.shape[0] // 2
    width = xb["input_ids"].shape[1]
    if gen.get("do_sample"):
        return  # sampling draws from one generator for the whole batch: rows are not comparable alone
    for b in range(2):
        x1 = _llava_inputs(proc, 2)
        x1 = {k: v[b:b + 1] for k, v in x1.items()}
        keep = x1["attention_mask"][0].bool()
        x1["input_ids"], x1["attention_mask"] = x1["input_ids"][:, keep], x1["attention_mask"][:, keep]
        out_1, _ = generate(x1, IN_LLM)
        new = out_1[:, x1["input_ids"].shape[1]:]
        assert torch.equal(out[b * rows:(b + 1) * rows, width:width + new.shape[1]], new)


@pytest.mark.parametrize("size", [pytest.param((2000, 20), marks=slow), (20, 2000), pytest.param((600, 1), marks=slow)])
def test_llava_next_very_wide_or_tall_images(size):
    """Unpadding can leave an anyres mosaic with no row (or no column); the stock model answers, and so does
    every plan (keep-all bit-identical, the newlines of column-less rows kept)."""
    model, proc = build_llava_with_processor("tiny-next", seed=0)
    x = proc(text=[prompt("What is it?")], images=[make_image(3, size)], return_tensors="pt")
    with torch.no_grad():
        ref = model(**x).logits
    with torch.no_grad(), tr.apply(model, "none"):
        assert torch.equal(model(**x).logits, ref)
    for plan in ("pool(keep=0.25)", "hired(keep=0.5)", "mustdrop-vision(threshold=0.3)"):
        with torch.no_grad(), tr.apply(model, plan) as h:
            out = model(**x).logits
        assert torch.isfinite(out).all() and h.report.tokens()[0] < h.report.tokens("input")[0]
