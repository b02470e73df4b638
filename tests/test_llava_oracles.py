"""The oracles of DESIGN.md section 5 for the LLaVA-1.5 adapter and every VISUAL reducer."""

from __future__ import annotations

import pytest
import torch
from matrix import case, names
from tokenreduce.adapters.llava.zoo import build_llava

import tokenreduce as tr
from tokenreduce.plan import Stage

#: every registered VISUAL reducer (the first three run in `-m "not slow"`, the rest in CI)
REDUCERS = names(Stage.VISUAL, fast=("aim-merge", "random", "pool"))
KEEP_ALL = [case(n).keep_all for n in names(Stage.VISUAL) if case(n).keep_all is not None]


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def greedy(model, inputs, n=6):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("plan", ["none", "aim-merge(tokens=64)+pool(keep=1.0)", *KEEP_ALL])
def test_noop_identity(model, single_inputs, plan):
    """A plan that keeps everything gives bit-identical logits and greedy tokens (sdpa and eager)."""
    ref_logits, ref_tokens = logits(model, single_inputs), greedy(model, single_inputs)
    with tr.apply(model, plan) as run:
        out_logits, out_tokens = logits(model, single_inputs), greedy(model, single_inputs)
    assert torch.equal(out_logits, ref_logits)
    assert torch.equal(out_tokens, ref_tokens)
    assert run.report.tokens() == [64]


def _explicit_reference(model, inputs, visual: tr.VisualTokens, positions: torch.Tensor):
    """The vanilla LLM on inputs_embeds holding exactly the kept tokens, built by hand."""
    ids = inputs["input_ids"][0]
    kept_pos = positions[0]
    embeds = model.get_input_embeddings()(ids[kept_pos]).clone()
    is_visual = torch.isin(kept_pos, visual.position)
    embeds[is_visual] = visual.features[torch.argsort(visual.position)].to(embeds.dtype)
    with torch.no_grad():
        return model(inputs_embeds=embeds[None]).logits


@pytest.mark.parametrize("name", REDUCERS)
@pytest.mark.parametrize("keep", [0.5, 0.25, 0.11])
def test_explicit_equivalence(model, single_inputs, name, keep):
    """Reduced forward == vanilla LLM on hand-built inputs_embeds of the kept tokens (atol 1e-4)."""
    with tr.apply(model, case(name).plan(keep)) as run:
        out = logits(model, single_inputs)
    call = run.report.last
    k = round(keep * 64)
    assert call.tokens() == [k]
    assert out.shape[1] == single_inputs["input_ids"].shape[1] - 64 + k
    ref = _explicit_reference(model, single_inputs, call.visual[0], call.positions)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_random_keeps_original_features(models, single_inputs):
    """Dropping never alters the kept features: they equal the projected features at their source."""
    model = models["sdpa"]
    with torch.no_grad():
        full = model.model.get_image_features(pixel_values=single_inputs["pixel_values"]).pooler_output[0]
    with tr.apply(model, "random(keep=0.25, seed=3)") as run:
        logits(model, single_inputs)
    vt = run.report.visual[0]
    kept_src = torch.nonzero(vt.source >= 0).flatten()
    assert torch.equal(vt.features[vt.source[kept_src]], full[kept_src])
    assert torch.equal(vt.position, single_inputs["input_ids"][0].eq(model.config.image_token_id).nonzero()
                       .flatten()[kept_src])


@pytest.mark.parametrize("name", REDUCERS)
def test_sdpa_eager_same_kept_set(models, single_inputs, name):
    kept, outs = {}, {}
    for attn, model in models.items():
        with tr.apply(model, case(name).plan(0.25)) as run:
            outs[attn] = logits(model, single_inputs)
        kept[attn] = run.report.visual[0]
    assert torch.equal(kept["sdpa"].source, kept["eager"].source)
    assert torch.equal(kept["sdpa"].position, kept["eager"].position)
    torch.testing.assert_close(outs["sdpa"], outs["eager"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", REDUCERS)
def test_batch_equals_each_sample_alone(model, processor, batch_parts, name):
    """A padded batch with ragged kept counts equals every sample run alone (logits and greedy tokens)."""
    texts, images = batch_parts
    plan = case(name).plan(0.25)
    batch = processor(text=texts, images=[i for imgs in images for i in imgs], padding=True, return_tensors="pt")
    with tr.apply(model, plan) as run:
        out_b = logits(model, batch)
        gen_b = greedy(model, batch)
    call = run.report.calls[0]
    assert call.tokens() == [16, 32, 16]  # ragged: the two-image sample keeps twice as many
    assert len(set(call.seq_llm)) > 1  # so the batch really is padded
    for b, (text, imgs) in enumerate(zip(texts, images)):
        single = processor(text=text, images=imgs, return_tensors="pt")
        with tr.apply(model, plan) as run1:
            out_1 = logits(model, single)
            gen_1 = greedy(model, single)
        n = run1.report.calls[0].seq_llm[0]
        assert call.seq_llm[b] == n
        torch.testing.assert_close(out_b[b, -n:], out_1[0], atol=1e-4, rtol=1e-4)
        # generate returns the caller's own prompt followed by the new tokens
        assert torch.equal(gen_b[b, : batch["input_ids"].shape[1]], batch["input_ids"][b])
        assert torch.equal(gen_b[b, batch["input_ids"].shape[1]:], gen_1[0, single["input_ids"].shape[1]:])


def test_detach_restores(single_inputs):
    fresh = build_llava("tiny", seed=0)
    model = build_llava("tiny", seed=0)
    ref = logits(fresh, single_inputs)
    handle = tr.attach(model, "aim-merge(keep=0.25)")
    assert logits(model, single_inputs).shape != ref.shape
    handle.detach()
    assert torch.equal(logits(model, single_inputs), ref)
    assert torch.equal(greedy(model, single_inputs), greedy(fresh, single_inputs))
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    lm = model.model.language_model
    assert not lm._forward_hooks and not lm._forward_pre_hooks
    handle.detach()  # idempotent


def test_apply_restores_when_body_raises(single_inputs):
    model = build_llava("tiny", seed=0)
    ref = logits(model, single_inputs)
    with pytest.raises(RuntimeError, match="boom"):
        with tr.apply(model, "pool(keep=0.25)"):
            logits(model, single_inputs)
            raise RuntimeError("boom")
    assert torch.equal(logits(model, single_inputs), ref)
    assert "forward" not in model.__dict__


def test_report_equals_real_shapes(model, processor, batch_parts):
    texts, images = batch_parts
    batch = processor(text=texts, images=[i for imgs in images for i in imgs], padding=True, return_tensors="pt")
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(tuple(kw["inputs_embeds"].shape[:2])), with_kwargs=True
    )
    try:
        with tr.apply(model, "aim-merge(tokens=20)") as run:
            out = logits(model, batch)
            greedy(model, batch, n=3)
    finally:
        hook.remove()
    fwd, gen = run.report.calls
    assert fwd.llm_shape == tuple(out.shape[:2]) == seen[0]
    assert gen.llm_shape == seen[1]  # the prefill of generate
    assert all(s == (3, 1) for s in seen[2:])  # decode steps
    for call in (fwd, gen):
        assert call.stages[0] == ("input", [64, 128, 64])
        assert call.tokens() == [20, 20, 20] == [len(v) for v in call.visual]
        assert call.seq_llm == (call.positions >= 0).sum(1).tolist()
        assert [a - b for a, b in zip(call.seq_in, call.seq_llm)] == [44, 108, 44]
        assert set(call.times) >= {"vision", "reduce:aim-merge", "prefill"}
        assert call.flops["llm_prefill"] < call.flops["llm_prefill_full"]
    # the last position maps to the caller's last position
    assert (fwd.positions[:, -1] == batch["input_ids"].shape[1] - 1).all()


def test_labels_follow_the_reduced_sequence(models, single_inputs):
    model = models["sdpa"]
    labels = single_inputs["input_ids"].clone()
    with tr.apply(model, "pool(keep=0.25)") as run:
        with torch.no_grad():
            out = model(**single_inputs, labels=labels)
    assert out.loss is not None and torch.isfinite(out.loss)
    pos = run.report.positions[0]
    # hand-made loss over the text positions of the reduced sequence
    ids = single_inputs["input_ids"][0, pos]
    target = ids.masked_fill(ids == model.config.image_token_id, -100)
    ref = torch.nn.functional.cross_entropy(out.logits[0, :-1], target[1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)


def test_two_models_reduced_at_once(single_inputs):
    a, b = build_llava("tiny", seed=0), build_llava("tiny", seed=1)
    with tr.apply(a, "pool(keep=0.5)") as ra, tr.apply(b, "aim-merge(keep=0.25)") as rb:
        logits(a, single_inputs)
        logits(b, single_inputs)
    assert ra.report.tokens() == [32] and rb.report.tokens() == [16]


def test_attaching_twice_is_refused(single_inputs):
    model = build_llava("tiny", seed=0)
    with tr.apply(model, "pool(keep=0.5)"):
        with pytest.raises(RuntimeError, match="already patched"):
            tr.attach(model, "random(keep=0.5)")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", REDUCERS)
def test_half_precision_no_nan(single_inputs, dtype, name):
    model = build_llava("tiny", seed=0, dtype=dtype)
    inputs = dict(single_inputs, pixel_values=single_inputs["pixel_values"].to(dtype))
    with tr.apply(model, case(name).plan(0.25)) as run:
        out = logits(model, inputs)
    assert torch.isfinite(out).all()
    assert run.report.visual[0].features.dtype == dtype


def test_text_only_calls_pass_through(models, processor):
    model = models["sdpa"]
    ids = processor.tokenizer("USER: hello ASSISTANT:", return_tensors="pt")
    ref = logits(model, ids)
    with tr.apply(model, "pool(keep=0.25)") as run:
        assert torch.equal(logits(model, ids), ref)
    assert run.report.calls == []


def test_budget_larger_than_tokens_is_a_clear_error(models, single_inputs):
    with tr.apply(models["sdpa"], "aim-merge(tokens=1000)"):
        with pytest.raises(tr.BudgetError, match=r"tokens=1000 is larger than the 64 visual tokens"):
            logits(models["sdpa"], single_inputs)


def test_placeholder_mismatch_is_a_clear_error(models, single_inputs):
    inputs = dict(single_inputs)
    ids = inputs["input_ids"].clone()
    ids[0, ids[0].eq(models["sdpa"].config.image_token_id).nonzero()[0]] = 10  # one placeholder fewer
    inputs["input_ids"] = ids
    with tr.apply(models["sdpa"], "pool(keep=0.5)"):
        with pytest.raises(tr.InputError, match="placeholder"):
            logits(models["sdpa"], inputs)


def test_model_without_adapter_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=100))
    with pytest.raises(tr.UnsupportedModelError, match="no tokenreduce adapter for LlamaForCausalLM"):
        tr.attach(lm, "pool(keep=0.5)")
